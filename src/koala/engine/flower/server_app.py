"""The ServerApp: the shared run loop (koala.run), with each round's tasks delivered to the
SuperNodes over the Grid (koala.engine.flower.grid). Flower calls this module by name, so it sits
with the Flower code, but it is an entry point, as the CLI is: it is where the run layer and the
Flower engine meet.

Deployment (`flwr run flower-app CONNECTION --run-config 'config="/abs/exp.toml" out="/abs/run"'`)
uses the module-level `app`; the simulation engine builds its own app around a config it already has.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from koala.algorithms import Algorithm
from koala.algorithms.devices import device_classes_of_clients
from koala.config import ExperimentConfig, load_config
from koala.engine.flower.grid import discover_partitions, grid_dispatch
from koala.errors import ConfigError
from koala.run.experiment import prepare_experiment
from koala.run.loop import Echo, RunResult, run_experiment
from koala.run.run_dir import read_run_config


def run_on_grid(grid: Grid, config: ExperimentConfig, out_dir: Path | None, echo: Echo, engine: str, resume: bool = False) -> RunResult:
    """Prepare the experiment on the server, find the SuperNodes and run every round over the Grid
    (with `resume`, the rounds after `out_dir`'s checkpoint)."""
    experiment = prepare_experiment(config)
    nodes, classes = discover_partitions(grid, config, echo)
    if classes:
        plan_for_announced_devices(experiment.algorithm, classes, echo)
    return run_experiment(experiment, grid_dispatch(grid, experiment.algorithm, nodes), out_dir, echo, engine=engine,
                          resume=resume)


def plan_for_announced_devices(algorithm: Algorithm, announced: dict[int, str], echo: Echo) -> None:
    """Plan the small models again with the device classes the SuperNodes named (`device-class` in
    their node config), in place of the seeded ones for those clients; classes must be [[devices]]'."""
    config = algorithm.config
    known = {device.name for device in config.devices}
    unknown = sorted({name for name in announced.values() if name not in known})
    if not config.devices or unknown:
        raise ConfigError(f"SuperNodes name device classes {unknown or sorted(set(announced.values()))} that the "
                          f"experiment does not list in [[devices]] ({sorted(known) or 'none'}): add them, or drop "
                          "device-class from those nodes' --node-config")
    classes = device_classes_of_clients(config.devices, config.data.num_clients, config.seed)
    algorithm.assign_device_classes([announced.get(client, name) for client, name in enumerate(classes)])
    echo(f"device classes named by {len(announced)} SuperNode(s) replace the seeded ones of their clients")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: `config` (a TOML file on the server host) and `out` come from the run config,
    or `resume` (a run directory on the server host) alone."""
    run_config = context.run_config
    if run_config.get("resume"):
        if run_config.get("config") or run_config.get("out"):
            raise ConfigError("resume=\"RUN_DIR\" continues a run with the config in RUN_DIR/config.toml: "
                              "give no config or out with it")
        run_dir = Path(str(run_config["resume"])).expanduser()
        run_on_grid(grid, read_run_config(run_dir), run_dir, print, engine="flower", resume=True)
        return
    if not run_config.get("config"):
        raise ConfigError("no experiment: pass --run-config 'config=\"/path/to/experiment.toml\"' to flwr run "
                          "(or 'resume=\"/path/to/run\"' to continue a run)")
    config = load_config(Path(str(run_config["config"])).expanduser())
    out = str(run_config.get("out", ""))
    run_on_grid(grid, config, Path(out).expanduser() if out else None, print, engine="flower")
