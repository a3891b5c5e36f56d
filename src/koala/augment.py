"""Augmentation of image batches already on the device: random horizontal flips and shifts.

Written here rather than taken from torchvision (which does not import beside this torch) and
vectorised over the batch: one gather builds every example's view, with no per-example Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_and_shift(images: torch.Tensor, generator: torch.Generator, flip: bool, max_shift: int) -> torch.Tensor:
    """A random view of each image (N, C, H, W): mirrored left-right with probability 1/2 when
    `flip`, and moved by up to `max_shift` pixels in each direction, the border pixels repeated
    into the space it leaves. `generator` lives on the images' device and makes the views repeatable."""
    n, channels, height, width = images.shape
    device = images.device
    if not flip and max_shift == 0:
        return images
    shift_y = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    shift_x = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    cols = torch.arange(width, device=device).expand(n, width)
    if flip:
        mirrored = torch.rand((n, 1), generator=generator, device=device) < 0.5
        cols = torch.where(mirrored, width - 1 - cols, cols)
    rows = torch.arange(height, device=device).expand(n, height) + shift_y
    cols = cols + shift_x
    padded = F.pad(images, (max_shift,) * 4, mode="replicate") if max_shift else images
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
