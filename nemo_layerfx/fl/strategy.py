"""Flower strategy for federated dropout: a FedAvg whose clients each get their own submodel.

Stock ``FedAvg`` sends one payload to every node and averages same-shaped replies. Here ``configure_train`` sends
each node the weights of its own submodel (units drawn per client per round, or per round) and ``aggregate_train``
maps every reply back through its unit map (``nemo_layerfx.fd.aggregate``), then steps the server optimizer.
A reply that is an error, non-finite or wrongly shaped is dropped with its reason; the round still completes, and
the global model is checkpointed atomically after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from nemo_layerfx.fd import (FreezeSpec, ServerOptimizer, aggregate, choose_units, plan_param_count, trained_names,
                             unit_seed)
from nemo_layerfx.surgery import slice_state, tensor_index, units_to_lists
from nemo_layerfx.evaluate import evaluate_wer
from nemo_layerfx.fl.task import (FLConfig, base_model, client_manifests, load_checkpoint, log, make_plan,
                                  save_checkpoint)


class FedDropout(FedAvg):
    """FedAvg over federated-dropout submodels; holds the global NeMo model and the run's history."""

    def __init__(self, cfg: FLConfig):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        from nemo_layerfx.models import clone_model

        self.cfg, self.out = cfg, Path(cfg.out)
        self.model = clone_model(base_model(str(Path(cfg.model).resolve()))).eval()
        self.plan = make_plan(cfg, len(self.model.encoder.layers))
        self.plan.check(self.model)
        self.server_opt = ServerOptimizer(cfg.server_opt, lr=cfg.server_lr)
        spec = FreezeSpec.from_dict(cfg.freeze)  # partial-variable training: only these tensors travel and change
        self.trained = set(trained_names(self.model, spec)) if spec else None
        self.done, self.history = 0, []
        state = load_checkpoint(self.out, cfg)
        if state is not None:
            self.model.load_state_dict(state["global"], strict=True)
            self.server_opt.state = state["server_opt"]
            self.done, self.history = int(state["round"]), list(state["history"])
            log.info("resuming after round %d from %s", self.done, self.out / "checkpoint.pt")
        else:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        self.partition: dict[int, int] = {}  # node id -> partition id (client index)
        self._sent: dict[int, dict] = {}

    # --- Flower hooks ----------------------------------------------------------------------------------------------
    def learn_partitions(self, grid: Grid, wait_s: float = 600) -> None:
        """Wait until one node per client is connected (a deployment's SuperNodes may still be starting), then ask
        every node its partition id (one query round trip), so unit seeds and reply order follow clients."""
        expected, deadline, said = len(client_manifests(self.cfg)), time.monotonic() + wait_s, 0.0
        while len(nodes := list(grid.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(nodes)} of {expected} SuperNodes connected after {wait_s:.0f} s (one per "
                                   f"client manifest); start the others, or set num_clients")
            if time.monotonic() - said > 30:
                log.warning("waiting for SuperNodes: %d of %d connected", len(nodes), expected)
                said = time.monotonic()
            time.sleep(1)
        nodes = sorted(nodes)
        queries = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=600):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not answer: {reply.error.reason}")
            self.partition[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.done
        state = self.model.state_dict()
        messages, self._sent = [], {}
        for node in sorted(grid.get_node_ids(), key=lambda n: self.partition.get(n, n)):
            if node not in self.partition:  # joined after the partition query (deployments): next run
                log.warning("round %d: node %d has no known partition id; not sent a submodel", rnd, node)
                continue
            client = self.partition[node]
            units = choose_units(self.model, self.plan, unit_seed(self.cfg.seed, rnd, client, self.plan.mapping))
            sub_state = {k: v.contiguous() for k, v in slice_state(state, tensor_index(self.model, units)).items()
                         if self.trained is None or k in self.trained}
            payload = ArrayRecord(sub_state)
            self._sent[node] = {"units": units, "bytes": payload.count_bytes(), "shapes": {k: v.shape for k, v in
                                                                                         sub_state.items()},
                                "params": plan_param_count(self.model, units)}
            conf = ConfigRecord({"server-round": rnd, "client": client, "plan": json.dumps(self.plan.to_dict()),
                                 "units": json.dumps(units_to_lists(units)), "seed": self.cfg.seed})
            messages.append(Message(RecordDict({"arrays": payload, "config": conf}), dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        rnd = server_round + self.done
        results, clients, dropped = [], [], []
        for msg in sorted(replies, key=lambda m: self.partition.get(m.metadata.src_node_id, 0)):
            node = msg.metadata.src_node_id
            client, sent = self.partition.get(node, node), self._sent.get(node)
            reason = self._check(msg, sent)
            if reason is not None:
                dropped.append({"client": client, "reason": reason})
                log.warning("round %d: dropped client %d from the aggregate: %s", rnd, client, reason)
                continue
            state = msg.content["arrays"].to_torch_state_dict()
            n = float(msg.content["metrics"]["num-examples"])
            results.append((state, sent["units"], n))
            clients.append({"client": client, "examples": n, "params": sent["params"], "bytes_down": sent["bytes"],
                            "bytes_up": msg.content["arrays"].count_bytes(),
                            "train_loss": float(msg.content["metrics"].get("train-loss", float("nan")))})
        if results:
            delta = aggregate(self.model.state_dict(), results, self.model, rule=self.cfg.rule,
                              keys=None if self.trained is None else sorted(self.trained))
            new_state = self.model.state_dict()
            self.server_opt.step_(new_state, delta)
            self.model.load_state_dict(new_state)
        else:
            log.warning("round %d: no usable client update; the global model is unchanged", rnd)
        entry = {"round": rnd, "clients": clients, "dropped": dropped, "time": time.time()}
        self.history.append(entry)
        self._checkpoint(rnd)
        metrics = MetricRecord({"clients-aggregated": len(results), "clients-dropped": len(dropped)})
        return ArrayRecord(self.model.state_dict()), metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server scores the global model itself (evaluate_global)

    # --- the rest --------------------------------------------------------------------------------------------------
    @staticmethod
    def _check(msg: Message, sent: dict | None) -> str | None:
        """Why a reply cannot be aggregated, or None."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if sent is None:
            return "reply from a node that was not sent a submodel"
        if "arrays" not in msg.content or "metrics" not in msg.content:
            return "reply lacks arrays or metrics"
        if float(msg.content["metrics"].get("num-examples", 0)) <= 0:
            return "reply reports no training examples"
        state = msg.content["arrays"].to_torch_state_dict()
        expected = sent["shapes"]
        if set(state) != set(expected):
            return f"reply has {len(state)} tensors, its submodel {len(expected)}"
        for k, v in state.items():
            if v.shape != expected[k]:
                return f"wrong shape for {k}: {tuple(v.shape)}, its submodel has {tuple(expected[k])}"
            if v.is_floating_point() and not torch.isfinite(v).all():
                return f"non-finite values in {k}"
        return None

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Dev WER of the global model after each round (and before the first); appended to metrics.jsonl."""
        rnd = server_round + self.done
        entry = next((h for h in self.history if h["round"] == rnd), None)
        if entry is None:  # round 0 of a fresh run
            entry = {"round": rnd, "clients": [], "dropped": []}
            self.history.append(entry)
        if "dev_wer" not in entry:  # a resumed run has scored its last round already, unless killed right before
            entry["dev_wer"] = evaluate_wer(self.model, Path(self.cfg.corpus) / "dev_manifest.json",
                                            self.cfg.dev_max_utterances)
            self._checkpoint(rnd)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            log.info("round %d: dev WER %.4f", rnd, entry["dev_wer"])
        return MetricRecord({"dev-wer": entry["dev_wer"]})

    def _checkpoint(self, rnd: int) -> None:
        save_checkpoint(self.out, {"round": rnd, "global": self.model.state_dict(), "history": self.history,
                                   "server_opt": self.server_opt.state, "config": asdict(self.cfg)})
