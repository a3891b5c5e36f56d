"""IDX files (the MNIST family's format): a big-endian header, then raw unsigned bytes.

The header is a magic number 0x0000TTDD (TT = 0x08 for unsigned bytes, DD = number of dimensions)
followed by DD big-endian uint32 sizes. Files may be gzipped (`name.gz`) or plain (`name`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from koala.errors import DataError

_UBYTE = 0x08
_CHUNK = 1 << 16


def find_idx_file(directory: Path, name: str) -> Path | None:
    """`directory/name.gz` if it exists, else `directory/name` if it exists, else None."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions into a writable uint8 array.

    A wrong magic number, a truncated or over-long payload, or a damaged gzip stream raises
    DataError naming the file.
    """
    data, damage = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _corrupt(path, damage or f"{len(data)} bytes, shorter than the {header_len}-byte header")
    magic = int.from_bytes(data[:4], "big")
    if magic != (_UBYTE << 8) | ndim:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions (magic number "
            f"0x{magic:08X}, expected 0x{(_UBYTE << 8) | ndim:08X}). {_reinstall_hint(path)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    found = len(data) - header_len
    problems = [damage] if damage else []
    if found != expected:
        problems.insert(0, f"expected {expected} bytes of data after the header for shape {shape}, found {found}")
    if problems:
        raise _corrupt(path, "; ".join(problems))
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _read_bytes(path: Path) -> tuple[bytearray, str]:
    """The file's (decompressed) bytes, and what is wrong with its gzip stream ('' if nothing).

    A damaged stream still yields what decompressed before the damage (to within one chunk), so
    the caller can say how much of the payload is there.
    """
    data = bytearray()
    decoder = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16) if path.suffix == ".gz" else None
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                data += decoder.decompress(chunk) if decoder else chunk
    except zlib.error as exc:
        return data, f"the gzip stream is damaged: {exc}"
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if decoder and not decoder.eof:
        return data, "the gzip stream ends early"
    return data, ""


def _corrupt(path: Path, detail: str) -> DataError:
    return DataError(f"{path} is truncated or corrupt ({detail}). {_reinstall_hint(path)}")


def _reinstall_hint(path: Path) -> str:
    return f"Reinstall it: delete {path} and download or copy the data set into {path.parent} again."
