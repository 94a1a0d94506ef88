"""Federated dropout on Flower: ``task`` (no Flower), ``strategy`` (FedDropout), ``client_app``, ``server_app``.

``simulate(cfg)`` runs a whole federation on this machine in Flower's simulation engine; the same apps run on a
Flower deployment (SuperLink + SuperNodes) through ``flwr run`` (see the README).
"""

from __future__ import annotations

from nemo_layerfx.fl.task import FLConfig


def simulate(cfg: FLConfig) -> dict:
    """Run ``cfg`` in Flower's simulation engine (one virtual SuperNode per client); returns the run summary."""
    import os
    from dataclasses import replace
    from pathlib import Path

    try:
        from flwr.simulation import run_simulation
    except ImportError as e:  # the core needs no Flower; federated runs do
        raise ImportError("federated runs need Flower: pip install 'nemo_layerfx[federated]'") from e
    from nemo_layerfx.fl.client_app import client_app_for
    from nemo_layerfx.fl.server_app import make_server_app
    from nemo_layerfx.fl.task import check_run, read_metrics

    # Ray workers may start elsewhere: every path absolute
    cfg = replace(cfg, model=str(Path(cfg.model).resolve()), corpus=str(Path(cfg.corpus).resolve()),
                  out=str(Path(cfg.out).resolve()))
    n = check_run(cfg)  # every input checked; the number of clients
    gpu = cfg.accelerator not in ("cpu",)
    run_simulation(server_app=make_server_app(cfg), client_app=client_app_for(cfg), num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 1.0 if gpu else 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1}})
    out = Path(cfg.out)
    rows = read_metrics(out)
    if not rows or rows[-1]["round"] != cfg.rounds:
        raise RuntimeError(f"the federated run stopped before round {cfg.rounds}; see the log above "
                           f"(last completed: {rows[-1]['round'] if rows else 'none'})")
    return {"rounds": rows, "checkpoint": str(out / "checkpoint.pt"), "plot": str(out / "metrics.png")}


__all__ = ["FLConfig", "simulate"]
