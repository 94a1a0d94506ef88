"""Flower ServerApp: federated dropout over speaker clients with the FedDropout strategy."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

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


def make_server_app(cfg: FLConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` (simulation), or reading ``context.run_config`` (``flwr run`` deployments)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg if cfg is not None else FLConfig.from_mapping(context.run_config))

    return app


app = make_server_app()  # `flwr run`: [tool.flwr.app.components] serverapp = "nemo_layerfx.fl.server_app:app"
