"""What one client's training really takes (`koala footprint`): a fresh Python process holds a
client's data, trains the model on it for an epoch at the given batch size and thread count, and
reports its measured peak resident memory, the increase over the same process idle with the data,
and the training time per sample, beside the accounting's estimate of one training step's memory
(`koala.accounting.measure`, a lower bound: it leaves out the allocator and temporaries).

The measurement runs in a child process (`python -m koala.accounting.footprint`) so that nothing the
caller allocated counts: peak resident memory is a property of a whole process. On Linux the child
also resets its high-water mark once the data and the model are in place, so that a transient peak
while importing (some machines' thread pools and allocators reach hundreds of MB there) does not
hide what training adds; where it cannot, a background thread samples the resident memory during
training instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

from koala.accounting.measure import measure_model
from koala.config import OptimizerConfig
from koala.data.dataset import ImageSplit
from koala.errors import ConfigError
from koala.models import InputSpec, model_entry
from koala.training import train_supervised
from koala.weights import initial_state, instantiate

MB = 1e6
"""Megabytes as the accounting counts them (10^6 bytes)."""


@dataclass(frozen=True)
class Footprint:
    """One client's measured training footprint, and the accounting's estimate beside it."""

    model: str
    batch_size: int
    threads: int
    samples: int
    layout: str
    """The memory layout the convolutions' weights were in after training ("channels_last" or
    "contiguous"; "contiguous" for a model without convolutions), read from the weights themselves."""
    idle_peak_mb: float
    """Peak resident memory of the process holding the data and the model, before training."""
    training_peak_mb: float
    """Peak resident memory of the process after an epoch of training."""
    seconds_per_sample: float
    """Wall time of the epoch per example, after one warm-up step (the first step builds kernels)."""
    estimate_mb: float
    """The accounting's training-step memory (weights, gradients, momentum, saved activations)."""

    @property
    def increase_mb(self) -> float:
        """What training adds to the idle process: the figure to compare with the estimate."""
        return self.training_peak_mb - self.idle_peak_mb


def peak_resident_mb() -> float:
    """This process's peak resident memory since it started or since `reset_peak_resident` (Linux's
    VmHWM), in MB; elsewhere the lifetime peak (ru_maxrss, in KiB on Linux, in bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            found = re.search(r"VmHWM:\s+(\d+) kB", status.read())
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024 / MB
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def reset_peak_resident() -> bool:
    """Lower this process's high-water mark to its current resident memory (Linux >= 4.0 only,
    through /proc/self/clear_refs); False where the platform cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def current_resident_mb() -> float:
    """This process's resident memory now, in MB (Linux's /proc/self/statm); elsewhere its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return peak_resident_mb()


class ResidentSampler:
    """Where the high-water mark cannot be reset: the largest resident memory a background thread
    sees every `interval` seconds while the block runs (a peak shorter than that may be missed)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak_mb = current_resident_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak_mb = max(self.peak_mb, current_resident_mb())

    def __enter__(self) -> ResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_resident_mb())


def measure_here(model: str, spec: InputSpec, batch_size: int, threads: int, samples: int,
                 contiguous: bool = False) -> Footprint:
    """Train `model` for one epoch on `samples` random images in this process and measure it (call it
    in a fresh process: `measure_footprint` does); `contiguous` overrides the model's memory format."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    data = ImageSplit(torch.randn(samples, spec.channels, spec.image_size, spec.image_size, generator=generator),
                      torch.randint(0, spec.num_classes, (samples,), generator=generator))
    network = instantiate(model, spec, initial_state(model, spec, 0), "cpu")
    if contiguous:
        network = network.to(memory_format=torch.contiguous_format)
    exact = reset_peak_resident()  # else a sampler watches the resident memory during training
    idle = peak_resident_mb() if exact else current_resident_mb()
    settings = OptimizerConfig(epochs=1, batch_size=batch_size, lr=0.01, momentum=0.9)
    with contextlib.nullcontext() if exact else ResidentSampler() as sampler:
        train_supervised(network, data.subset(torch.arange(batch_size)), settings, seed=1)  # warm-up: kernels, pools
        start = time.perf_counter()
        train_supervised(network, data, settings, seed=0)
        seconds = time.perf_counter() - start
    peak = peak_resident_mb() if exact else sampler.peak_mb
    estimate = measure_model(model, spec, batch_size, momentum=True).train_memory_bytes / MB
    return Footprint(model, batch_size, threads, samples, trained_layout(network), idle, peak, seconds / samples, estimate)


def trained_layout(network: torch.nn.Module) -> str:
    """"channels_last" if every 4-D weight of `network` is laid out channels_last (and not also
    contiguous, as 1x1 kernels can be), else "contiguous"."""
    kernels = [p for p in network.parameters() if p.dim() == 4 and not p.is_contiguous()]
    channels_last = bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    return "channels_last" if channels_last else "contiguous"


def measure_footprint(model: str, spec: InputSpec, batch_size: int, threads: int, samples: int,
                      contiguous: bool = False) -> Footprint:
    """`measure_here` in a fresh Python process, so that the peak is the client's alone."""
    model_entry(model)  # an unknown name fails here, with the known ones listed
    if batch_size < 2 or samples < batch_size:
        raise ConfigError(f"--batch-size must be at least 2 and at most --samples (got {batch_size} and {samples})")
    command = [sys.executable, "-m", "koala.accounting.footprint", model,
               f"{spec.channels},{spec.image_size},{spec.num_classes}", str(batch_size), str(threads), str(samples),
               *(["--contiguous"] if contiguous else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise ConfigError(f"the footprint process failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return Footprint(**json.loads(done.stdout.strip().splitlines()[-1]))


def _worker() -> None:
    parser = argparse.ArgumentParser(description="the child process of koala footprint (not for direct use)")
    parser.add_argument("model")
    parser.add_argument("spec")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("threads", type=int)
    parser.add_argument("samples", type=int)
    parser.add_argument("--contiguous", action="store_true")
    args = parser.parse_args()
    channels, size, classes = (int(x) for x in args.spec.split(","))
    footprint = measure_here(args.model, InputSpec(channels, size, classes), args.batch_size, args.threads, args.samples,
                             args.contiguous)
    print(json.dumps(asdict(footprint)))


if __name__ == "__main__":
    _worker()
