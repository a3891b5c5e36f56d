"""The `koala` command: run experiments, fetch data sets, list models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from koala.errors import KoalaError


def _run(args: argparse.Namespace) -> None:
    from koala.config import load_config
    from koala.engine.local import run_local

    config = load_config(args.config, args.set)
    run_local(config, args.out)


def _download(args: argparse.Namespace) -> None:
    from koala.data.download import download_dataset

    path = download_dataset(args.name, args.dir)
    print(f"{args.name} is ready in {path}")


def _models(args: argparse.Namespace) -> None:
    from koala.models import InputSpec, build_model, count_parameters, model_entry, model_names

    channels, size = (int(v) for v in args.input.split(","))
    spec = InputSpec(channels, size, args.classes)
    print(f"{'name':<20} {'role':<6} {'parameters':>12}  description")
    for name in model_names():
        entry = model_entry(name)
        print(f"{name:<20} {entry.role:<6} {count_parameters(build_model(name, spec)):>12,}  {entry.description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala", description="KOALA federated knowledge-transfer fine-tuning")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment from a TOML config")
    run.add_argument("config", type=Path, help="experiment file, e.g. configs/quickstart.toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set data.alpha=0.3 (repeatable)")
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-ALGORITHM-TIME)")
    run.set_defaults(handler=_run)

    data = commands.add_parser("data", help="manage data sets").add_subparsers(dest="data_command", required=True)
    download = data.add_parser("download", help="fetch a data set from its official source, checksum-verified")
    download.add_argument("name", choices=["fashion-mnist", "cifar10", "cifar100"])
    download.add_argument("--dir", type=Path, default=None, help="target directory (default: the loader's default)")
    download.set_defaults(handler=_download)

    models = commands.add_parser("models", help="list the registered models and their parameter counts")
    models.add_argument("--input", default="1,28", metavar="C,SIZE", help="input channels and image size")
    models.add_argument("--classes", type=int, default=10)
    models.set_defaults(handler=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KoalaError as exc:
        print(f"koala: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("koala: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
