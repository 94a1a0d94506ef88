"""Flower ClientApp: rebuild this round's submodel, train it E local steps on this client's speaker, reply.

The client holds the global model's ``.nemo`` (architecture and tokenizer) and receives only its submodel's
weights and unit map each round; it replies with the trained submodel weights and its example count.
"""

from __future__ import annotations

import json
import os
import sys

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from nemo_layerfx.fd import DropoutPlan, FreezeSpec, extract, freeze_
from nemo_layerfx.fl.runtime import watch_parents
from nemo_layerfx.surgery import units_from_lists
from nemo_layerfx.fl.task import FLConfig, base_model, client_manifests, train_submodel


def client_train(msg: Message, context: Context, c: FLConfig) -> Message:
    """One round on one client: rebuild the submodel the server chose, load its weights, train, reply."""
    if os.environ.get("LAYERFX_QUIET_LOGS"):  # started by a `layerfx` command that keeps NeMo's logs quiet
        from nemo_layerfx.quiet import quiet_console

        quiet_console()
    pid, conf = int(context.node_config["partition-id"]), msg.content["config"]
    rnd = int(conf["server-round"])
    base = base_model(c.model)
    sub, _ = extract(base, DropoutPlan.from_dict(json.loads(conf["plan"])),
                     units=units_from_lists(json.loads(conf["units"])))
    received = msg.content["arrays"].to_torch_state_dict()
    spec = FreezeSpec.from_dict(c.freeze)
    if spec:  # partial-variable training: the frozen tensors are the global .nemo's, never sent
        trained = freeze_(sub, spec)
        if set(received) != set(trained):
            raise ValueError(f"the server sent {len(received)} tensors, this client trains {len(trained)} under "
                             f"freeze={c.freeze}")
    sub.load_state_dict(received, strict=not spec)
    manifest = client_manifests(c)[pid]
    n, loss = train_submodel(sub, manifest, c, seed=int(conf["seed"]) * 7919 + rnd * 131 + pid, full=base)
    state = sub.state_dict()
    reply = {k: state[k] for k in trained} if spec else state  # only what it trained
    return Message(RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord(
        {"num-examples": n, "train-loss": loss})}), reply_to=msg)


def client_query(msg: Message, context: Context) -> Message:
    """The server asks each node which client (partition) it is."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def make_client_app() -> ClientApp:
    """Our ClientApp: it reads the run's FLConfig from ``context.run_config`` (``flwr run``, simulated or deployed).
    When the config names another client app (``client_app``), every message goes to that one instead."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        watch_client_parents()
        cfg = run_config(context)
        return client_app_for(cfg)(msg, context) if cfg.client_app else client_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        watch_client_parents()
        cfg = run_config(context)
        return client_app_for(cfg)(msg, context) if cfg.client_app else client_train(msg, context, cfg)

    return app


def watch_client_parents() -> None:
    """A deployment's ClientApp process (``flwr-clientapp``) ends with the SuperNode that started it; a simulation's
    client actors live in Ray's workers, which Ray ends itself."""
    if os.path.basename(sys.argv[0]) == "flwr-clientapp":
        watch_parents()


def run_config(context: Context) -> FLConfig:
    return FLConfig.from_mapping(context.run_config)


_CUSTOM: dict[str, ClientApp] = {}


def client_app_for(cfg: FLConfig) -> ClientApp:
    """The ClientApp that ``cfg.client_app`` ("module:function") builds from ``cfg`` (built once per process and
    run config); ours when it is empty."""
    if not cfg.client_app:
        return app
    key = json.dumps(cfg.to_run_config(), sort_keys=True)
    if key not in _CUSTOM:
        import importlib

        module, _, name = cfg.client_app.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"client_app={cfg.client_app!r}: cannot load it ({e})") from e
        _CUSTOM[key] = factory(cfg)
    return _CUSTOM[key]


app = make_client_app()  # the app's component: clientapp = "nemo_layerfx.fl.client_app:app"
