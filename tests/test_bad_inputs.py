"""Bad configuration and data: one clear message naming the problem and the fix, nothing half-written.

Every case here is a row of the README's table of errors; a test checks that the table keeps up.
"""

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import BASE, ROOT, cli_overrides
from helpers import DIGITS as DIGITS_DATA
from safetensors.torch import save_file

from koala.cli import main
from koala.config import config_to_toml, load_config

FASHION = Path("/usr/share/datasets/fashion-mnist")
DIGITS = cli_overrides([*DIGITS_DATA, "data.num-clients=4"])


def _set(*assignments: str) -> list[str]:
    return cli_overrides(assignments)


def _truncated_fashion_mnist(tmp: Path) -> list[str]:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    data = tmp / "fashion"
    shutil.copytree(FASHION, data)
    images = data / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200_000])
    return [str(BASE), *_set(f"data.dir='{data}'")]


def _weights_of_another_model(tmp: Path) -> list[str]:
    weights = tmp / "lenet.safetensors"
    save_file({"features.0.weight": torch.zeros(16, 1, 3, 3)}, str(weights))
    return [str(BASE), *_set("large-init.kind='file'", f"large-init.path='{weights}'")]


def _pickled_objects_as_weights(tmp: Path) -> list[str]:
    weights = tmp / "checkpoint.pt"  # a training checkpoint, not a state dict: an optimizer and a Python object
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3, "optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)},
               weights)
    return [str(BASE), *_set("large-init.kind='file'", f"large-init.path='{weights}'")]


def _tensors_not_by_name(tmp: Path) -> list[str]:
    weights = tmp / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], weights)
    return [str(BASE), *_set("large-init.kind='file'", f"large-init.path='{weights}'")]


def _empty_config(tmp: Path) -> list[str]:
    config = tmp / "empty.toml"
    config.write_text("# the experiment, to be written\n\n")
    return [str(config)]


def _invalid_toml(tmp: Path) -> list[str]:
    config = tmp / "broken.toml"
    config.write_text("rounds = 3\n[data\nalpha = 0.5\n")
    return [str(config)]


def _not_a_run(tmp: Path) -> list[str]:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("not a run\n")
    return ["--resume", str(tmp / "notes")]


def _garbage_checkpoint(tmp: Path) -> list[str]:
    run = tmp / "run"
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(load_config(None, DIGITS[1::2])))
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    return ["--resume", str(run)]


def _occupied_out(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "results.csv").write_text("precious\n")
    return [str(BASE), *DIGITS, "--out", str(tmp / "out")]


Case = tuple[list[str] | Callable[[Path], list[str]], str]
CASES: dict[str, Case] = {
    "unknown key": ([str(BASE), *_set("data.alpah=0.1")], "data.alpah: unknown key. Did you mean 'alpha'?"),
    "wrong type": ([str(BASE), *_set("rounds='ten'")], "rounds: Input should be a valid integer (got 'ten')"),
    "out of range": ([str(BASE), *_set("client.participation=1.5")],
                     "client.participation: Input should be less than or equal to 1 (got 1.5)"),
    "unknown model": ([str(BASE), *_set("models.large='resnet-18'")],
                      "unknown model 'resnet-18'. Did you mean 'resnet18'? Known models: lenet,"),
    "unknown dataset": ([str(BASE), *_set("data.dataset='mnist'")],
                        "data.dataset: Input should be 'fashion-mnist', 'cifar10', 'cifar100', 'digits' or 'synthetic'"),
    "unknown fusion rule": ([str(BASE), *_set("distill.fusion='vote'")],
                            "distill.fusion: unknown fusion rule 'vote'; known rules: confidence, consensus, sample-share, uniform"),
    "missing data directory": ([str(BASE), *_set("data.dir='/nonexistent/fmnist'")],
                               "apt-get install -y dataset-fashion-mnist"),
    "truncated IDX file": (_truncated_fashion_mnist, "train-images-idx3-ubyte.gz is truncated or corrupt"),
    "proxy set leaves clients no data": ([str(BASE), *DIGITS, *_set("data.proxy-fraction=0.999")],
                                         "1 training image(s) remain for 4 clients after the proxy set"),
    "more clients than samples": ([str(BASE), *DIGITS, *_set("data.num-clients=2000")],
                                  "1293 training image(s) remain for 2000 clients"),
    "client minimum impossible": ([str(BASE), *DIGITS, *_set("data.min-client-size=500")],
                                  "cannot give 4 clients at least 500 examples each"),
    "labelled set larger than proxy set": ([str(BASE), *DIGITS, *_set("data.proxy-labelled=5000")],
                                           "data.proxy-labelled = 5000 but the proxy set holds only 144 images"),
    "pretraining without labels": ([str(BASE), *_set("large-init.kind='pretrain'")],
                                   "large-init.kind = 'pretrain' needs a labelled server set"),
    "labels term without labels": ([str(BASE), *_set("distill.reverse-ce-weight=1.0")],
                                  "distill.reverse-ce-weight > 0 needs a labelled server set"),
    "a guard larger than the labelled set": (
        [str(BASE), *_set("distill.reverse-guard-size=400", "data.proxy-labelled=300")],
        "distill.reverse-guard-size = 400 holds out that many labelled server images, but data.proxy-labelled = 300"),
    "a guard tolerance without a guard": (
        [str(BASE), *_set("distill.reverse-guard-tolerance=0.02")],
        "distill.reverse-guard-tolerance = 0.02 is the guard's tolerance, but distill.reverse-guard-size = 0 turns "
        "the guard off"),
    "a proxy split without forward distillation": (
        [str(BASE), *_set("algorithm='feddf'", "distill.proxy-split='disjoint'")],
        "distill.proxy-split = 'disjoint' divides the proxy images between reverse and forward distillation, but "
        "algorithm = 'feddf' has no forward distillation: set distill.proxy-split = 'shared'"),
    "a proxy split with forward distillation off": (
        [str(BASE), *_set("distill.proxy-split='alternating'", "distill.forward.epochs=0")],
        "distill.proxy-split = 'alternating' divides the proxy images between reverse and forward distillation, but "
        "distill.forward.epochs = 0 turns forward distillation off"),
    "a proxy split of too few unlabelled images": (
        [str(BASE), *DIGITS, *_set("distill.proxy-split='disjoint'", "data.proxy-labelled=143")],
        "distill.proxy-split = 'disjoint' cuts the unlabelled proxy images into two halves, but the proxy set holds 1 "
        "unlabelled image(s) of 144"),
    "alternating halves with a forward warm-up": (
        [str(BASE), *_set("distill.proxy-split='alternating'", "distill.forward-warmup-rounds=1")],
        "distill.proxy-split = 'alternating' divides the proxy images between reverse and forward distillation, "
        "alternating halves by round, but distill.forward-warmup-rounds = 1 skips forward distillation in the first rounds"),
    "min-replies above the sample": ([str(BASE), *_set("client.min-replies=20")],
                                     "client.min-replies = 20 but a round samples only 10 client(s)"),
    "vectorised training of a model with dropout": (
        [str(BASE), *_set("client.vectorised=true", "models.small=['mobilenetv3-small']")],
        "client.vectorised: mobilenetv3-small has dropout (classifier.2, p=0.2)"),
    "architecture without clients": ([str(BASE), *DIGITS, *_set("models.small=['lenet','mobilenetv3-small']",
                                                                      "models.assignment=['lenet','lenet','lenet','lenet']")],
                                     "models.assignment gives no client ['mobilenetv3-small']"),
    "shares do not match models": ([str(BASE), *_set("models.small-shares=[0.5,0.5]")],
                                   "models.small-shares has 2 entries but models.small has 1"),
    "missing weights file": ([str(BASE), *_set("large-init.kind='file'", "large-init.path='/nonexistent.safetensors'")],
                             "weights file /nonexistent.safetensors does not exist (large-init.path)"),
    "weights of another model": (_weights_of_another_model, "does not fit resnet18-ds: missing"),
    "weights file that is not a state dict": (_pickled_objects_as_weights,
                                              "checkpoint.pt is not a plain state dict (a mapping of names to tensors)"),
    "weights file of tensors not by name": (_tensors_not_by_name,
                                            "list.pt is not a plain state dict (a mapping of names to tensors)"),
    "empty config file": (_empty_config, "empty.toml sets nothing (it is empty or only comments)"),
    "missing config file": (["missing.toml"], "config file missing.toml does not exist"),
    "invalid TOML": (_invalid_toml, "is not valid TOML"),
    "malformed --set": ([str(BASE), "--set", "rounds"], "--set 'rounds': expected key=value"),
    "resume directory that is not a run": (_not_a_run, "is not a koala run directory"),
    "damaged checkpoint": (_garbage_checkpoint, "is damaged: it cannot be read as safetensors"),
    "occupied output directory": (_occupied_out, "already exists and is not empty; choose another --out"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_message_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, message = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    arguments = args(inputs) if callable(args) else list(args)
    out = tmp_path / "out"
    if "--resume" not in arguments and "--out" not in arguments:
        arguments += ["--out", str(out)]
    before = _snapshot(tmp_path)
    assert main(["run", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koala: error:") and message in err, err
    assert "Traceback" not in err and "weights_only=False" not in err  # never the advice to unpickle
    assert _snapshot(tmp_path) == before  # no run directory, and every input as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(BASE), *DIGITS, *_set("device='cuda'"), "--out", str(tmp_path / "out")]) == 2
    assert "device = 'cuda' but torch sees no GPU here; set device = 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_torch_state_dict_file_and_a_safetensors_file_start_the_large_model_alike(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from koala.models import InputSpec
    from koala.weights import initial_state, load_weights

    spec = InputSpec(1, 8, 10)
    reference = initial_state("lenet", spec, 0)
    trained = {name: tensor + 1 for name, tensor in reference.items()}
    torch.save(trained, tmp_path / "weights.pt")
    save_file(trained, str(tmp_path / "weights.safetensors"))
    for name in ("weights.pt", "weights.safetensors"):
        loaded = load_weights(tmp_path / name, "lenet", reference)
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_a_config_that_only_names_itself_runs_the_defaults_on_purpose(tmp_path: Path) -> None:
    config = tmp_path / "defaults.toml"
    config.write_text('name = "defaults"\n')
    assert load_config(config).name == "defaults" and load_config(config).rounds == load_config(None).rounds


def test_the_readme_lists_every_bad_input_with_its_message() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Errors"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 15
    for case, (_, message) in CASES.items():
        assert any(case in row and _unescape(message) in _unescape(row) for row in rows), f"README lacks {case!r}: {message}"


def _unescape(text: str) -> str:
    """Markdown table text as plain text (escaped pipes, code spans)."""
    return re.sub(r"\\\|", "|", text).replace("`", "")
