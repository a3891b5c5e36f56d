"""What the tests share: the config they start from (tests/base.toml) and the overrides that turn it
into a run of seconds on scikit-learn's digits (real data, installed with the package)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from koala.algorithms import RoundMetrics
from koala.algorithms.client import client_seed, local_train
from koala.run.experiment import Experiment
from koala.state import ClientUpdate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BASE = Path(__file__).resolve().parent / "base.toml"
"""The config the tests start from: the quickstart as it was before it became the shipped recipe
(a ResNet-18 server model, 10 LeNet clients, the paper's round), so that tuning configs/ moves no test."""

DIGITS = ["data.dataset='digits'", "data.train-limit=0", "data.test-limit=0", "data.min-client-size=20"]
"""Any config on all of digits (1,797 8x8 images; the official split has no test images of its own,
so the source sets some aside), clients of at least 20 images."""

DIGITS_KOALA = [*DIGITS, "data.num-clients=4", "data.proxy-fraction=0.3", "models.large='lenet'", "client.lr=0.05",
                "client.batch-size=32", "distill.reverse.lr=0.05", "distill.reverse.batch-size=32"]
"""KOALA on digits with a LeNet as the large model too, 4 clients and a 30 % proxy set, at learning
rates that learn digits in a few rounds."""


def cli_overrides(overrides: Iterable[str]) -> list[str]:
    """The same overrides as `koala run` arguments (`--set KEY=VALUE` each)."""
    return [part for override in overrides for part in ("--set", override)]


def round_one_updates(experiment: Experiment) -> list[ClientUpdate]:
    """Every client's update of round 1, each trained from the experiment's initial state."""
    state = experiment.algorithm.initial_state(RoundMetrics())
    return [
        local_train(experiment.algorithm.client_task(state, cid), experiment.split.client_data(cid), experiment.config,
                    experiment.spec, client_seed(experiment.config, 1, cid))
        for cid in range(experiment.split.num_clients)
    ]


# -- CIFAR in its official python-pickle layout, written by the tests ------------------------


def cifar_batch(rng, count, label_key, num_classes, protocol, path: Path) -> tuple[np.ndarray, list[int]]:
    """Write a random batch; protocol "py2" mimics the official files, written by Python 2's cPickle."""
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count).tolist()
    if protocol == "py2":
        path.write_bytes(python2_batch(data, label_key, labels))
    else:
        batch = {b"batch_label": b"fixture", label_key: labels, b"data": data, b"filenames": [b"x.png"] * count}
        with path.open("wb") as out:
            pickle.dump(batch, out, protocol=protocol)
    return data, labels


def python2_batch(data: np.ndarray, label_key: bytes, labels: list[int]) -> bytes:
    """Protocol-2 opcodes as Python 2 emits them: byte strings are `str` (T), numpy 1 module names."""

    def string(raw: bytes) -> bytes:
        return b"T" + len(raw).to_bytes(4, "little") + raw

    dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    shape = b"J" + len(data).to_bytes(4, "little") + b"M\x00\x0c\x86"  # (N, 3072)
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
    array += b"(K\x01" + shape + dtype + b"\x89" + string(data.tobytes()) + b"tb"
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(label_key) + label_list + b"u."


def write_cifar10(root: Path, per_batch: int, test: int, seed: int = 0) -> Path:
    """A CIFAR-10 directory in the official layout (five training batches of `per_batch` random
    images, a test batch of `test`), as `koala data download cifar10` leaves it; returns `root`."""
    rng = np.random.default_rng(seed)
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for i in range(1, 6):
        cifar_batch(rng, per_batch, b"labels", 10, 2, batches / f"data_batch_{i}")
    cifar_batch(rng, test, b"labels", 10, "py2", batches / "test_batch")
    return root
