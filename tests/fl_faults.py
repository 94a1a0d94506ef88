"""A test-only Flower ClientApp: nemo_layerfx's client, with faults injected by client and round, to test how the
server copes (a crash, NaN weights, weights of the wrong shape). Chosen with the federated config's
``client_app=tests.fl_faults:make_client_app`` and ``client_options={faults: {client<i>[_round<r>]: kind}}``; the
production client app knows nothing of it."""

from __future__ import annotations

import math
import re

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from nemo_layerfx.fl.client_app import client_query, client_train
from nemo_layerfx.fl.task import FLConfig

FAULTS = ("crash", "nan", "shape")
KEY = re.compile(r"client(\d+)(_round\d+)?")
TENSOR = "encoder.layers.0.feed_forward1.linear1.weight"


def read_faults(cfg: FLConfig) -> dict[str, str]:
    # YAML reads an unquoted nan as a float
    faults = {str(k): "nan" if isinstance(v, float) and math.isnan(v) else v
              for k, v in cfg.client_options.get("faults", {}).items()}
    bad = {k: v for k, v in faults.items() if v not in FAULTS or not KEY.fullmatch(k)}
    if bad:
        raise ValueError(f"bad fault(s) {bad}: keys are client<i> or client<i>_round<r>, values {', '.join(FAULTS)}")
    return faults


def make_client_app(cfg: FLConfig) -> ClientApp:
    faults = read_faults(cfg)
    app = ClientApp()
    app.query()(client_query)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        fault = faults.get(f"client{pid}_round{rnd}", faults.get(f"client{pid}"))
        if fault == "crash":
            raise RuntimeError(f"client {pid} crashed in round {rnd} (configured fault)")
        reply = client_train(msg, context, cfg)
        if fault is None:
            return reply
        state = reply.content["arrays"].to_torch_state_dict()
        if fault == "nan":
            state[TENSOR][0, 0] = torch.nan
        else:
            state[TENSOR] = torch.zeros(3, 3)
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": reply.content["metrics"]}),
                       reply_to=msg)

    return app
