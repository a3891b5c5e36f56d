"""Download a data set's official files, verify their MD5 checksums, and unpack archives safely.

Files are streamed to a temporary file beside the target and renamed only once the checksum
matches, so an interrupted or corrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from koala.data.cifar import cifar_dir
from koala.data.fashion_mnist import fashion_mnist_dir
from koala.errors import DataError

TIMEOUT_S = 30.0
_CHUNK = 1 << 20
# The official Fashion-MNIST mirror is an S3 website endpoint, which serves plain HTTP only;
# the pinned checksums are what make the download trustworthy.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where from, and its MD5 checksum."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": (
        RemoteFile(FASHION_MNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        RemoteFile(FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        RemoteFile(FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        RemoteFile(FASHION_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "cifar10": (RemoteFile(CIFAR_URL + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (RemoteFile(CIFAR_URL + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
}
_OFFLINE_HINTS = {"fashion-mnist": ", or install the Debian package dataset-fashion-mnist"}
# Where each loader looks when given no directory (its env var, else its default).
_LOADER_DIRS: dict[str, Callable[[], Path]] = {
    "fashion-mnist": fashion_mnist_dir,
    "cifar10": partial(cifar_dir, "cifar10"),
    "cifar100": partial(cifar_dir, "cifar100"),
}


def download_dataset(name: str, directory: Path | str | None = None, *, progress: bool = True) -> Path:
    """Fetch data set `name` into `directory` (None: where its loader looks by default), skipping
    files already there with the right checksum; unpack any archive and return the directory."""
    if name not in DOWNLOADS:
        raise DataError(f"cannot download unknown data set {name!r}; known: {', '.join(DOWNLOADS)}")
    directory = Path(directory).expanduser() if directory else _LOADER_DIRS[name]()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create download directory {directory}: {exc.strerror or exc}") from None
    for remote in DOWNLOADS[name]:
        hint = _OFFLINE_HINTS.get(name, "")
        path = fetch(remote.url, directory / remote.filename, remote.md5, progress=progress, hint=hint)
        if path.name.endswith(".tar.gz"):
            extract_archive(path, directory)
    return directory


def fetch(
    url: str, destination: Path, md5: str, *, progress: bool = True, hint: str = "", timeout: float = TIMEOUT_S
) -> Path:
    """Download `url` to `destination` unless it is already there with checksum `md5`.

    The bytes go to a temporary file in the same directory, renamed to `destination` only when the
    checksum matches; on any failure the temporary file is removed. `hint` is appended to the
    advice given when the URL cannot be reached.
    """
    if destination.is_file() and file_md5(destination) == md5:
        return destination
    temp: Path | None = None
    try:
        handle, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        temp = Path(name)
        with os.fdopen(handle, "wb") as out:
            actual = _stream(url, out, destination, progress=progress, hint=hint, timeout=timeout)
        _require_md5(f"{destination} (downloaded from {url}; not kept)", md5, actual)
        os.replace(temp, destination)
    except OSError as exc:
        raise DataError(f"cannot write {destination}: {exc.strerror or exc}") from None
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    return destination


def _stream(url: str, out: BinaryIO, destination: Path, *, progress: bool, hint: str, timeout: float) -> str:
    """Copy `url` into the open file `out` in chunks, with a progress bar; return the MD5 digest."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except OSError as exc:  # URLError, refused or timed-out connections are all OSErrors
        raise _unreachable(url, exc, destination, hint) from None
    length = response.headers.get("Content-Length")
    with response, tqdm(
        total=int(length) if length else None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=destination.name,
        disable=not progress,
    ) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _unreachable(url, exc, destination, hint) from None
            if not chunk:
                return digest.hexdigest()
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def _unreachable(url: str, exc: Exception, destination: Path, hint: str) -> DataError:
    reason = getattr(exc, "reason", None) or exc
    return DataError(
        f"could not reach {url} ({reason}); this machine may be offline. Download the files "
        f"elsewhere and copy them to {destination.parent}{hint}."
    )


def file_md5(path: Path) -> str:
    """The MD5 hex digest of the file at `path`, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise DataError naming `path`, the expected and the actual checksum, if they differ."""
    _require_md5(str(path), expected, file_md5(path))


def _require_md5(what: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise DataError(
            f"{what} failed its checksum: expected md5 {expected}, got {actual}. The file is corrupt, "
            "incomplete or not the official one; download it again."
        )


def extract_archive(archive: Path, directory: Path) -> None:
    """Unpack a tar archive (any compression) into `directory`.

    Members with absolute paths or '..' components are refused before anything is written, and
    tarfile's "data" filter rejects links out of the tree, device files and unsafe permissions.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise DataError(
                        f"{archive} contains the unsafe path {member.name!r}, which would be written "
                        f"outside {directory}; refusing to unpack it. Download the archive again from "
                        "the official site."
                    )
            tar.extractall(directory, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"cannot unpack {archive} into {directory} ({exc}). If the archive is truncated or corrupt, "
            "delete it and download it again."
        ) from None
