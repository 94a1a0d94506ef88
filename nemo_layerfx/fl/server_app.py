"""Flower ServerApp: federated dropout over speaker clients with the FedDropout strategy."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from nemo_layerfx.fl.runtime import watch_parents
from nemo_layerfx.fl.strategy import FedDropout
from nemo_layerfx.fl.task import FLConfig, log, plot_metrics


def run_server(grid: Grid, cfg: FLConfig) -> FedDropout:
    """Resume or start, then run the rounds still to do; returns the strategy (global model and history)."""
    strategy = FedDropout(cfg)
    if strategy.done >= cfg.rounds:
        log.info("all %d rounds are done already (%s)", cfg.rounds, cfg.out)
        return strategy
    strategy.learn_partitions(grid)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(strategy.model.state_dict()),
                   num_rounds=cfg.rounds - strategy.done, evaluate_fn=strategy.evaluate_global)
    final = Path(cfg.out) / "global.nemo"  # the trained global model, written atomically
    strategy.model.save_to(str(final.with_suffix(".tmp.nemo")))
    final.with_suffix(".tmp.nemo").replace(final)
    plot_metrics(cfg.out)
    return strategy


def make_server_app() -> ServerApp:
    """Our ServerApp: it reads the run's FLConfig from ``context.run_config`` (``flwr run``, simulated or deployed)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if os.environ.get("LAYERFX_QUIET_LOGS"):  # started by a `layerfx` command that keeps NeMo's logs quiet
            from nemo_layerfx.quiet import quiet_console

            quiet_console()
        watch_parents()  # end with the processes that started this one
        run_server(grid, FLConfig.from_mapping(context.run_config))

    return app


app = make_server_app()  # the app's component: serverapp = "nemo_layerfx.fl.server_app:app"
