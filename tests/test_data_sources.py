"""Data sources: real Fashion-MNIST, IDX validation, CIFAR pickles (incl. refusing malicious ones),
the built-in sources, and the download helpers without any network."""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cifar_batch

from koala.data import SOURCE_NAMES, load_source
from koala.data.cifar import load_cifar10, load_cifar100
from koala.data.download import (
    DOWNLOADS,
    RemoteFile,
    download_dataset,
    extract_archive,
    fetch,
    verify_md5,
)
from koala.data.fashion_mnist import DEFAULT_DIR, ENV_VAR, load_fashion_mnist
from koala.data.idx import read_idx
from koala.data.small_sources import load_digits_source, make_synthetic
from koala.errors import DataError

FASHION_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
needs_fashion = pytest.mark.skipif(
    not (DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {DEFAULT_DIR}",
)


# --- Fashion-MNIST and IDX -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist(DEFAULT_DIR)


@pytest.fixture(scope="module")
def plain_fashion_dir(tmp_path_factory):
    """The installed files, ungzipped into a fresh directory."""
    directory = tmp_path_factory.mktemp("fashion-plain")
    for name in FASHION_FILES:
        with gzip.open(DEFAULT_DIR / f"{name}.gz") as source, (directory / name).open("wb") as target:
            shutil.copyfileobj(source, target)
    return directory


def _assert_same(a, b) -> None:
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(split_a.images, split_b.images)
        assert torch.equal(split_a.labels, split_b.labels)


@needs_fashion
def test_fashion_mnist_shapes_balance_and_normalisation(fashion) -> None:
    assert fashion.name == "fashion-mnist" and fashion.num_classes == 10
    assert fashion.train.images.shape == (60000, 1, 28, 28) and fashion.test.images.shape == (10000, 1, 28, 28)
    assert fashion.train.images.dtype == torch.float32 and fashion.train.labels.dtype == torch.int64
    assert torch.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert abs(fashion.train.images.mean().item()) < 0.01
    assert abs(fashion.train.images.std().item() - 1.0) < 0.01
    assert (fashion.channels, fashion.image_size) == (1, 28)


@needs_fashion
def test_plain_idx_files_load_identically(fashion, plain_fashion_dir) -> None:
    _assert_same(load_fashion_mnist(plain_fashion_dir), fashion)


@needs_fashion
def test_env_var_selects_directory(fashion, plain_fashion_dir, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(plain_fashion_dir))
    _assert_same(load_source("fashion-mnist"), fashion)


def test_missing_directory_names_path_and_both_fixes(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_fashion_mnist(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "koala data download fashion-mnist --dir DIR" in message


@needs_fashion
def test_missing_file_is_named(tmp_path) -> None:
    shutil.copy(DEFAULT_DIR / "train-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*missing.*apt-get install"):
        load_fashion_mnist(tmp_path)


@needs_fashion
def test_truncated_gz_is_named(tmp_path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes((DEFAULT_DIR / path.name).read_bytes()[:100_000])
    pattern = r"t10k-images-idx3-ubyte\.gz is truncated or corrupt \(expected 7840000 .*the gzip stream ends early"
    with pytest.raises(DataError, match=pattern):
        read_idx(path, ndim=3)


@needs_fashion
def test_truncated_plain_idx_is_named(tmp_path, plain_fashion_dir) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes((plain_fashion_dir / path.name).read_bytes()[:-1])
    pattern = r"t10k-labels-idx1-ubyte is truncated or corrupt \(expected 10000 .* 9999\)"
    with pytest.raises(DataError, match=pattern):
        read_idx(path, ndim=1)


def test_damaged_gzip_trailer_is_reported(tmp_path) -> None:
    payload = gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    path = tmp_path / "labels.gz"
    path.write_bytes(payload[:-4] + b"\xff\xff\xff\xff")  # wrong uncompressed-size field
    with pytest.raises(DataError, match=r"labels\.gz is truncated or corrupt \(the gzip stream is damaged"):
        read_idx(path, ndim=1)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x01", b"\x12\x34\x56\x78", b"\x00\x00\x0d\x03"])
def test_wrong_magic_number_is_named(tmp_path, magic) -> None:
    path = tmp_path / "images"
    path.write_bytes(magic + (1).to_bytes(4, "big") * 3 + b"\x00")
    with pytest.raises(DataError, match=rf"{path} is not an IDX file .*expected 0x00000803"):
        read_idx(path, ndim=3)


def test_read_idx_layout(tmp_path) -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "small-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in pixels.shape) + pixels.tobytes())
    assert np.array_equal(read_idx(path, ndim=3), pixels)


# --- CIFAR ------------------------------------------------------------------------------------------


def _expected_images(data: np.ndarray, mean, std) -> torch.Tensor:
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255.0
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture()
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    parts = [cifar_batch(rng, 3, b"labels", 10, 2, batches / f"data_batch_{i}") for i in range(1, 6)]
    test = cifar_batch(rng, 2, b"labels", 10, "py2", batches / "test_batch")
    return tmp_path, parts, test


@pytest.mark.parametrize("use_batches_dir", [False, True])
def test_cifar10_fixture_loads(cifar10_dir, use_batches_dir) -> None:
    root, parts, (test_data, test_labels) = cifar10_dir
    source = load_cifar10(root / "cifar-10-batches-py" if use_batches_dir else root)
    assert source.name == "cifar10" and source.num_classes == 10
    assert source.train.images.shape == (15, 3, 32, 32) and source.test.images.shape == (2, 3, 32, 32)
    assert source.train.labels.tolist() == [label for _, labels in parts for label in labels]
    assert source.test.labels.tolist() == test_labels
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train_data = np.concatenate([data for data, _ in parts])
    assert torch.allclose(source.train.images, _expected_images(train_data, mean, std), atol=1e-5)
    assert torch.allclose(source.test.images, _expected_images(test_data, mean, std), atol=1e-5)


@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar100_fixture_loads_fine_labels(tmp_path, monkeypatch, protocol) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_data, train_labels = cifar_batch(rng, 4, b"fine_labels", 100, protocol, folder / "train")
    _, test_labels = cifar_batch(rng, 3, b"fine_labels", 100, protocol, folder / "test")
    monkeypatch.setenv("KOALA_CIFAR100_DIR", str(tmp_path))
    source = load_source("cifar100")
    assert source.num_classes == 100 and source.channels == 3 and source.image_size == 32
    assert source.train.labels.tolist() == train_labels and source.test.labels.tolist() == test_labels
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    assert torch.allclose(source.train.images, _expected_images(train_data, mean, std), atol=1e-5)


def test_cifar_missing_names_path_and_download_command(tmp_path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar100(tmp_path)
    assert str(tmp_path) in str(err.value) and "koala data download cifar100 --dir DIR" in str(err.value)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins

        return builtins.eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)


@pytest.mark.parametrize("payload", [_RunsCommand, _Evaluates])
def test_malicious_pickle_is_refused_without_running(cifar10_dir, tmp_path, payload) -> None:
    root = cifar10_dir[0]
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3 refers to .*refusing"):
        load_cifar10(root)
    assert not marker.exists()


def test_corrupt_and_malformed_pickles_are_named(cifar10_dir) -> None:
    root = cifar10_dir[0]
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(DataError, match=r"test_batch is not a valid cifar10 batch"):
        load_cifar10(root)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(DataError, match=r"test_batch .*labels must lie in 0\.\.9"):
        load_cifar10(root)


# --- built-in sources -------------------------------------------------------------------------------


def test_digits_split_is_stratified_normalised_and_seeded() -> None:
    source = load_digits_source(test_fraction=0.2, seed=3)
    assert source.train.images.shape[1:] == (1, 8, 8) and source.num_classes == 10
    assert len(source.train) + len(source.test) == 1797 and len(source.test) == 360
    assert torch.bincount(source.test.labels, minlength=10).min() >= 34
    assert abs(source.train.images.mean().item()) < 0.05 and abs(source.train.images.std().item() - 1) < 0.05
    _assert_same(load_digits_source(test_fraction=0.2, seed=3), source)
    assert not torch.equal(load_digits_source(seed=4).test.labels, source.test.labels)


def test_synthetic_is_deterministic_and_learnable() -> None:
    sizes = {"num_classes": 5, "channels": 3, "image_size": 16}
    source = make_synthetic(500, 200, **sizes, seed=7)
    assert source.train.images.shape == (500, 3, 16, 16) and source.test.images.shape == (200, 3, 16, 16)
    _assert_same(load_source("synthetic", num_train=500, num_test=200, **sizes, seed=7), source)
    assert not torch.equal(make_synthetic(500, 200, **sizes, seed=8).train.images, source.train.images)
    # Nearest class mean, estimated on the training split, classifies the test split.
    flat = source.train.images.flatten(1)
    means = torch.stack([flat[source.train.labels == c].mean(0) for c in range(5)])
    predicted = torch.cdist(source.test.images.flatten(1), means).argmin(1)
    assert (predicted == source.test.labels).float().mean() > 0.9


def test_load_source_rejects_unknown_names_and_options() -> None:
    assert set(SOURCE_NAMES) == {"fashion-mnist", "cifar10", "cifar100", "digits", "synthetic"}
    with pytest.raises(DataError, match="unknown data set 'mnist'.*fashion-mnist, cifar10, cifar100, digits"):
        load_source("mnist")
    with pytest.raises(DataError, match="'synthetic'.*num_pixels"):
        load_source("synthetic", num_pixels=5)
    with pytest.raises(DataError, match="'digits'.*directory"):
        load_source("digits", "/data")


# --- download helpers (no network) ------------------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_verify_md5(tmp_path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"koala")
    verify_md5(path, _md5(b"koala"))
    with pytest.raises(DataError) as err:
        verify_md5(path, "0" * 32)
    assert all(s in str(err.value) for s in (str(path), "0" * 32, _md5(b"koala")))


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_archive(tmp_path) -> None:
    archive = _tar_gz(tmp_path / "a.tar.gz", {"batches/data_batch_1": b"one", "batches/meta": b"two"})
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/batches/data_batch_1").read_bytes() == b"one"
    assert (tmp_path / "out/batches/meta").read_bytes() == b"two"


@pytest.mark.parametrize("bad_name", ["../evil", "batches/../../evil", "/tmp/koala-evil"])
def test_extract_archive_refuses_escaping_members(tmp_path, bad_name) -> None:
    archive = _tar_gz(tmp_path / "a.tar.gz", {"batches/ok": b"fine", bad_name: b"pwned"})
    with pytest.raises(DataError, match="unsafe path"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()


def test_fetch_file_url_verifies_checksum(tmp_path) -> None:
    source = tmp_path / "remote" / "train-labels-idx1-ubyte.gz"
    source.parent.mkdir()
    source.write_bytes(b"label bytes" * 1000)
    target_dir = tmp_path / "data"
    target_dir.mkdir()
    destination = target_dir / source.name

    with pytest.raises(DataError) as err:
        fetch(source.as_uri(), destination, "f" * 32, progress=False)
    assert "f" * 32 in str(err.value) and _md5(source.read_bytes()) in str(err.value)
    assert list(target_dir.iterdir()) == []  # neither the target nor the temporary file remains

    fetch(source.as_uri(), destination, _md5(source.read_bytes()), progress=False)
    assert destination.read_bytes() == source.read_bytes() and list(target_dir.iterdir()) == [destination]
    # Present with the right checksum: skipped, so even an unreachable URL is fine.
    fetch("http://127.0.0.1:9/never-contacted", destination, _md5(source.read_bytes()), progress=False)


def test_fetch_offline_error_says_what_to_do(tmp_path) -> None:
    url = "http://127.0.0.1:9/train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as err:
        fetch(url, tmp_path / "train-images-idx3-ubyte.gz", "0" * 32, progress=False, timeout=5)
    message = str(err.value)
    assert f"could not reach {url}" in message and "offline" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


def test_download_dataset_rejects_unknown_name(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown data set 'imagenet'.*cifar10"):
        download_dataset("imagenet", tmp_path)


def test_download_dataset_fetches_unpacks_and_skips(cifar10_dir, tmp_path, monkeypatch) -> None:
    root = cifar10_dir[0]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(DOWNLOADS, "cifar10", (RemoteFile(archive.as_uri(), _md5(archive.read_bytes())),))
    target = tmp_path / "downloaded"
    monkeypatch.setenv("KOALA_CIFAR10_DIR", str(target))  # no directory given: where the loader looks
    assert download_dataset("cifar10", progress=False) == target
    _assert_same(load_cifar10(), load_cifar10(root))
    archive.unlink()  # a second run finds the verified archive in place and fetches nothing
    download_dataset("cifar10", target, progress=False)
