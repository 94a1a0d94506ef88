"""Flower ClientApp: rebuild this round's submodel, train it E local steps on this client's speaker, reply.

The client holds the global model's ``.nemo`` (architecture and tokenizer) and receives only its submodel's
weights and unit map each round; it replies with the trained submodel weights and its example count.
"""

from __future__ import annotations

import json
import os

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from nemo_layerfx.fd import DropoutPlan, extract, units_from_lists
from nemo_layerfx.fl.task import FLConfig, base_model, client_manifests, train_submodel


def make_client_app(cfg: FLConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` (simulation), or reading ``context.run_config`` (``flwr run`` deployments)."""
    app = ClientApp()

    def config(context: Context) -> FLConfig:
        return cfg if cfg is not None else FLConfig.from_mapping(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if os.environ.get("LAYERFX_QUIET_LOGS"):  # started by a `layerfx` command that keeps NeMo's logs quiet
            from nemo_layerfx.quiet import quiet_console

            quiet_console()
        c, pid = config(context), int(context.node_config["partition-id"])
        conf = msg.content["config"]
        rnd = int(conf["server-round"])
        fault = c.fault(pid, rnd)
        if fault == "crash":
            raise RuntimeError(f"client {pid} crashed in round {rnd} (configured fault)")
        base = base_model(c.model)
        sub, _ = extract(base, DropoutPlan.from_dict(json.loads(conf["plan"])),
                         units=units_from_lists(json.loads(conf["units"])))
        sub.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
        manifest = client_manifests(c)[pid]
        n, loss = train_submodel(sub, manifest, c, seed=int(conf["seed"]) * 7919 + rnd * 131 + pid, full=base)
        state = sub.state_dict()
        if fault == "nan":
            state["encoder.layers.0.feed_forward1.linear1.weight"][0, 0] = torch.nan
        if fault == "shape":
            state["encoder.layers.0.feed_forward1.linear1.weight"] = torch.zeros(3, 3)
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
            {"num-examples": n, "train-loss": loss})}), reply_to=msg)

    return app


app = make_client_app()  # `flwr run`: [tool.flwr.app.components] clientapp = "nemo_layerfx.fl.client_app:app"
