"""The `koala` command: run experiments, fetch data sets, list models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from koala.errors import ConfigError, KoalaError


def _run(args: argparse.Namespace) -> None:
    from koala.config import load_config

    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: a run has at least 1 round")
    if args.resume is not None:
        if args.config is not None or args.set or args.out is not None:
            raise ConfigError(
                "--resume RUN_DIR continues a run with the config in RUN_DIR/config.toml: "
                "give no CONFIG, --set or --out with it"
            )
        from koala.run.run_dir import read_run_config

        config, out, resume = read_run_config(args.resume, args.rounds), args.resume, True
    elif args.rounds is not None:
        raise ConfigError("--rounds N continues a run (with --resume RUN_DIR); a new run takes --set rounds=N")
    elif args.config is None:
        raise ConfigError("koala run needs an experiment file (e.g. configs/quickstart.toml) or --resume RUN_DIR")
    else:
        config, out, resume = load_config(args.config, args.set), args.out, False
    if args.engine == "flower-sim":
        try:
            from koala.engine.flower.simulation import run_flower_simulation
        except ImportError:
            raise ConfigError("--engine flower-sim needs Flower: pip install 'koala-fl[flower]'") from None
        run_flower_simulation(config, out, resume=resume)
    else:
        from koala.run.launch import run_local

        run_local(config, out, resume=resume)


def _download(args: argparse.Namespace) -> None:
    from koala.data.download import download_dataset

    path = download_dataset(args.name, args.dir)
    print(f"{args.name} is ready in {path}")


def _input_spec(text: str, classes: int):
    """An InputSpec from "C,H,W" (or "C,SIZE"); models take square images."""
    from koala.models import InputSpec

    try:
        dims = [int(v) for v in text.split(",")]
    except ValueError:
        dims = []
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ConfigError(f"--input {text!r}: expected C,H,W (e.g. 3,224,224) or C,SIZE (e.g. 1,28)")
    if len(dims) == 3 and dims[1] != dims[2]:
        raise ConfigError(f"--input {text!r}: the models take square images; give H = W")
    if classes < 2:
        raise ConfigError(f"--classes {classes}: a classifier needs at least 2 classes")
    return InputSpec(dims[0], dims[1], classes)


def _models(args: argparse.Namespace) -> None:
    import torch

    from koala.models import build_model, count_parameters, model_entry, model_names

    spec = _input_spec(args.input, args.classes)
    print(f"{'name':<28} {'role':<6} {'parameters':>12}  description")
    for name in model_names():
        entry = model_entry(name)
        with torch.device("meta"):  # counting only: nothing is allocated or initialised
            model = build_model(name, spec)
        print(f"{name:<28} {entry.role:<6} {count_parameters(model):>12,}  {entry.description}")


def _resources(args: argparse.Namespace) -> None:
    from koala.accounting.measure import TRAIN_MEMORY_METHOD, measure_model
    from koala.models import model_entry
    from koala.report import cost_table

    spec = _input_spec(args.input, args.classes)
    small = [name for name in args.small.split(",") if name]
    for name in [args.large, *small]:
        model_entry(name)  # an unknown name fails before anything is measured
    large = measure_model(args.large, spec, args.batch_size)
    costs = [large, *(measure_model(name, spec, args.batch_size) for name in small)]
    print(f"input {spec.channels}x{spec.image_size}x{spec.image_size}, {spec.num_classes} classes; "
          f"savings are the small model's against the large one ({args.large})")
    print(cost_table(costs, large))
    print(f"training memory: {TRAIN_MEMORY_METHOD} (batch {args.batch_size}).")


def _report(args: argparse.Namespace) -> None:
    from koala.report import write_report

    target = write_report(args.runs, args.out)
    print(target.read_text().split("\n\n")[1])
    print(f"wrote {target} and its plots in {args.out}/")


def _footprint(args: argparse.Namespace) -> None:
    from koala.accounting.footprint import measure_footprint

    spec = _input_spec(args.input, args.classes)
    layout = "the contiguous layout" if args.contiguous else "each model's own layout"
    print(f"one client's training in a fresh process: {args.samples} random {args.input} images, one epoch, "
          f"{args.threads} thread(s), {layout}")
    print("| model | batch | layout | peak RSS (MB) | idle with the data (MB) | training adds (MB) | estimate (MB) "
          "| adds / estimate | ms per sample |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for model in args.model:
        for batch_size in args.batch_size:
            f = measure_footprint(model, spec, batch_size, args.threads, args.samples, args.contiguous)
            print(f"| {f.model} | {f.batch_size} | {f.layout} | {f.training_peak_mb:.1f} | {f.idle_peak_mb:.1f} | {f.increase_mb:.1f} "
                  f"| {f.estimate_mb:.1f} | {f.increase_mb / f.estimate_mb:.2f} | {1000 * f.seconds_per_sample:.3f} |",
                  flush=True)
    print("estimate: the accounting's memory of one training step (weights, gradients, momentum, saved "
          "activations): a lower bound that leaves out the allocator and short-lived temporaries")


def _export(args: argparse.Namespace) -> None:
    from koala.run.export import export_onnx, export_safetensors, load_run_model

    if args.out.exists():
        raise ConfigError(f"{args.out} already exists: choose another --out (an export never overwrites a file)")
    model = load_run_model(args.run_dir, args.model)
    if args.format == "safetensors":
        export_safetensors(model, args.out)
        print(f"wrote {args.out}: the weights of {model.name} ({model.architecture}) after round {model.round}")
        return
    check = export_onnx(model, args.out)
    recorded = "" if check.recorded_accuracy is None else f", the run recorded {100 * check.recorded_accuracy:.2f}%"
    print(f"wrote {args.out}: {model.name} ({model.architecture}) after round {model.round}, verified with onnxruntime "
          f"on {check.images} test images: logits within {check.max_difference:.2g} of PyTorch's, accuracy "
          f"{100 * check.exported_accuracy:.2f}% (PyTorch {100 * check.pytorch_accuracy:.2f}%{recorded})")


def _certs(args: argparse.Namespace) -> None:
    try:
        from koala.engine.flower.certificates import write_certificates
    except ImportError:
        raise ConfigError("koala certs needs Flower's dependencies: pip install 'koala-fl[flower]'") from None
    paths = write_certificates(args.out, args.address, args.days)
    print(f"wrote {paths['ca']} and {paths['cert']} (subjectAltName: {', '.join(args.address)}), and their keys "
          f"{paths['ca-key']} and {paths['key']} (owner-only); give ca.pem to the SuperNodes and the flwr machine, "
          "server.pem and server.key to the SuperLink, and keep ca.key away from all of them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala", description="KOALA federated knowledge-transfer fine-tuning")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment from a TOML config")
    run.add_argument("config", type=Path, nargs="?", help="experiment file, e.g. configs/quickstart.toml")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue a stopped run from its last checkpoint (with the config it was started with)")
    run.add_argument("--rounds", type=int, default=None, metavar="N",
                     help="with --resume: continue the run to N rounds, past its end (its other settings kept)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set data.alpha=0.3 (repeatable)")
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-ALGORITHM-TIME)")
    run.add_argument("--engine", choices=["local", "flower-sim"], default="local",
                     help="local: every client in this process (default); flower-sim: Flower's simulation engine")
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

    resources = commands.add_parser(
        "resources", help="parameters, bytes, FLOPs and training memory of a large and small models, without training"
    )
    resources.add_argument("--large", required=True, help="the large (server) model, e.g. vgg19-imagenet")
    resources.add_argument("--small", required=True, help="small (client) models, comma-separated")
    resources.add_argument("--input", default="1,28,28", metavar="C,H,W", help="input shape (default 1,28,28)")
    resources.add_argument("--classes", type=int, default=10)
    resources.add_argument("--batch-size", type=int, default=64, help="batch size of the training-memory figure")
    resources.set_defaults(handler=_resources)

    report = commands.add_parser("report", help="compare run directories: a Markdown table and PNG plots")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the plots go")
    report.set_defaults(handler=_report)

    footprint = commands.add_parser(
        "footprint", help="measure one client's training in a fresh process: peak memory and time per sample"
    )
    footprint.add_argument("--model", nargs="+", required=True, help="one or more models, e.g. lenet resnet18-ds")
    footprint.add_argument("--input", default="1,28,28", metavar="C,H,W", help="input shape (default 1,28,28)")
    footprint.add_argument("--classes", type=int, default=10)
    footprint.add_argument("--batch-size", type=int, nargs="+", default=[64], help="one or more client batch sizes")
    footprint.add_argument("--threads", type=int, default=1, help="torch threads of the client process (default 1)")
    footprint.add_argument("--contiguous", action="store_true",
                           help="train in the contiguous layout even where the model's own is channels_last (to compare)")
    footprint.add_argument("--samples", type=int, default=2000, help="the client's examples (default 2000)")
    footprint.set_defaults(handler=_footprint)

    export = commands.add_parser("export", help="write a run's large or small model for devices (ONNX or safetensors)")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--model", default="large", metavar="large|small:ARCH",
                        help="which model: the large one (default) or a small one, e.g. small:lenet")
    export.add_argument("--format", choices=["onnx", "safetensors"], default="onnx",
                        help="onnx: the network for an inference runtime, verified with onnxruntime; safetensors: bare weights")
    export.add_argument("--out", type=Path, required=True, help="the file to write (never overwritten)")
    export.set_defaults(handler=_export)

    certs = commands.add_parser("certs", help="write a CA and a SuperLink TLS certificate for a Flower deployment")
    certs.add_argument("--address", action="append", required=True, metavar="HOST_OR_IP",
                       help="an address the SuperLink is reached at (repeat for each: IP addresses and host names)")
    certs.add_argument("--out", type=Path, required=True, help="directory for ca.pem, ca.key, server.pem, server.key")
    certs.add_argument("--days", type=int, default=365, help="how long the certificates are valid (default 365)")
    certs.set_defaults(handler=_certs)
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
