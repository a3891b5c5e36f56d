"""`koala run --engine flower-sim`: the same run on Flower's simulation engine (Ray), one virtual
SuperNode per client, each holding partition K = client K."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from koala.config import ExperimentConfig
from koala.engine.flower.client_app import app as client_app
from koala.engine.flower.server_app import run_on_grid
from koala.errors import KoalaError
from koala.run.loop import Echo, RunResult


def run_flower_simulation(
    config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print, cpus_per_client: float = 1.0,
    resume: bool = False,
) -> RunResult:
    """Run `config` on Flower's simulation engine and return what the run wrote (with `resume`, the
    rounds after `out_dir`'s checkpoint)."""
    results: list[RunResult] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            results.append(run_on_grid(grid, config, out_dir, echo, engine="flower-sim", resume=resume))
        except BaseException as exc:  # re-raised below: Flower only logs errors of the ServerApp
            errors.append(exc)
            raise

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=config.data.num_clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    if errors:
        raise errors[0]
    if not results:
        raise KoalaError("the Flower simulation ended without finishing the run; its log above says why")
    return results[0]
