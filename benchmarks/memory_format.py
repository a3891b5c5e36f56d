"""Benchmark: how fast each model trains and infers on this CPU in the contiguous (NCHW) and the
channels_last memory format, at a given thread count. Its table decides each architecture's
`memory_format` in the model registry (channels_last where it wins clearly).

    OMP_NUM_THREADS=1 python benchmarks/memory_format.py --threads 1
    python benchmarks/memory_format.py --threads 2 --models lenet resnet18-ds

One SGD step (forward, cross-entropy, backward, step) on a batch of 64 random 1x28x28 images, and
inference on 512, each timed `--steps` times after 3 warm-up steps; medians. Both layouts are timed
in one process, alternately, so the machine's load affects them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from koala.models import InputSpec, build_model, model_entry

SPEC = InputSpec(1, 28, 10)
DEFAULT_MODELS = ["lenet-narrow", "lenet", "lenet-wide", "shufflenetv2-0.5-ds", "shufflenetv2-0.5", "shufflenetv2",
                  "mobilenetv3-small-imagenet", "mobilenetv3-small", "mobilenetv2", "resnet18-ds", "resnet18", "vgg11"]


def _timings(name: str, channels_last: bool, steps: int) -> tuple[float, float]:
    """Median seconds of one training step (batch 64) and of inference on 512 images."""
    torch.manual_seed(0)
    model = build_model(name, SPEC)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(64, *[SPEC.channels, SPEC.image_size, SPEC.image_size]), torch.randint(0, 10, (64,))
    train = []
    model.train()
    for step in range(steps + 3):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 3:
            train.append(time.perf_counter() - start)
    model.eval()
    batch = torch.randn(512, SPEC.channels, SPEC.image_size, SPEC.image_size)
    infer = []
    with torch.no_grad():
        for _ in range(max(3, steps // 4)):
            start = time.perf_counter()
            model(batch)
            infer.append(time.perf_counter() - start)
    return statistics.median(train), statistics.median(infer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), 1x28x28, batch 64 (train) / 512 (inference)\n")
    print("| model | train step, contiguous (ms) | train step, channels_last (ms) | speed-up | inference, contiguous (ms) "
          "| inference, channels_last (ms) | speed-up | registry's format |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        contiguous = _timings(name, False, args.steps)
        channels_last = _timings(name, True, args.steps)
        train_gain, infer_gain = contiguous[0] / channels_last[0], contiguous[1] / channels_last[1]
        print(f"| {name} | {1000 * contiguous[0]:.1f} | {1000 * channels_last[0]:.1f} | {train_gain:.2f}x "
              f"| {1000 * contiguous[1]:.0f} | {1000 * channels_last[1]:.0f} | {infer_gain:.2f}x "
              f"| {model_entry(name).memory_format} |", flush=True)


if __name__ == "__main__":
    main()
