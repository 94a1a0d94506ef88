"""Federated dropout on Flower: ``task`` (no Flower), ``strategy`` (FedDropout), ``client_app``, ``server_app``.

``simulate(cfg)`` runs a whole federation on this machine on Flower's simulation runtime (``flwr run`` against a
simulation SuperLink; ``runtime``); the same apps run on a Flower deployment (SuperLink + SuperNodes) through
``flwr run`` (see the README).
"""

from __future__ import annotations

from nemo_layerfx.fl.task import FLConfig


def simulate(cfg: FLConfig) -> dict:
    """Run ``cfg`` on Flower's simulation runtime, as ``flwr run`` does it: a simulation SuperLink of this run's
    own on loopback, one virtual SuperNode per client; returns the run summary."""
    import os
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    try:
        import flwr  # noqa: F401  (the runtime below only starts Flower's commands)
    except ImportError as e:  # the core needs no Flower; federated runs do
        raise ImportError("federated runs need Flower: pip install 'nemo_layerfx[federated]'") from e
    from nemo_layerfx.fl import runtime
    from nemo_layerfx.fl.task import check_run, read_metrics

    # the ServerApp and client actors run in other processes, started elsewhere: every path absolute
    cfg = replace(cfg, model=str(Path(cfg.model).resolve()), corpus=str(Path(cfg.corpus).resolve()),
                  out=str(Path(cfg.out).resolve()))
    n = check_run(cfg)  # every input checked; the number of clients
    gpu = cfg.accelerator not in ("cpu",)
    federation = {"num-supernodes": n, "client-resources-num-cpus": cfg.client_cpus,
                  "client-resources-num-gpus": 1.0 if gpu else 0.0, "init-args-num-cpus": os.cpu_count() or 1}
    with tempfile.TemporaryDirectory(prefix="layerfx_flwr_") as tmp:
        home = Path(tmp)
        app = runtime.write_app(cfg, home / "app")
        link, port = runtime.start_superlink(home / "flwr", simulation=True, owned=True)
        try:
            runtime.connect(home / "flwr", "local-simulation", port)
            runtime.flwr_run(app, home / "flwr", "local-simulation", federation)
        finally:
            link.stop()
    out = Path(cfg.out)
    rows = read_metrics(out)
    if not rows or rows[-1]["round"] != cfg.rounds:
        raise RuntimeError(f"the federated run stopped before round {cfg.rounds}; see the log above "
                           f"(last completed: {rows[-1]['round'] if rows else 'none'})")
    return {"rounds": rows, "checkpoint": str(out / "checkpoint.pt"), "plot": str(out / "metrics.png")}


__all__ = ["FLConfig", "simulate"]
