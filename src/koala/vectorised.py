"""Vectorised client training: the clients of one architecture trained together in one pass.

Their parameters are stacked along a leading client axis and every step's forward and backward is
batched over clients with `torch.func` (`vmap` of `grad` over `functional_call`). Each client still
does exactly the steps it would do alone with `koala.training.sgd_train`: its own batch order from
its own seed, its own SGD momentum, its own learning-rate schedule. Clients with fewer examples run
out of steps and simply stop; a step at which the clients' batches differ in size (a trailing
partial batch) runs once per size, so no batch is padded and BatchNorm sees exactly its own batch.

The SGD step is written here, not taken from `torch.optim.SGD`, because the optimiser must hold one
learning rate and one momentum buffer per client on the stacked tensors; it follows `torch.optim.SGD`
(no dampening, no Nesterov) step for step.

Supported layers: everything without randomness in training (convolutions, linear layers, pooling,
activations, BatchNorm with its running statistics). Dropout is refused with an error, since its
draws could not match those of sequential training.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from koala.config import OptimizerConfig
from koala.data.dataset import ImageSplit
from koala.errors import ConfigError
from koala.state import StateDict
from koala.training import TrainOutcome, shuffled_batches


def require_vectorisable(model: nn.Module, architecture: str) -> None:
    """Raise a ConfigError naming the first layer of `model` that vectorised training cannot run."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ConfigError(
                f"client.vectorised: {architecture} has dropout ({name}, p={module.p}), whose random draws "
                "cannot match sequential training; set client.vectorised = false for this architecture"
            )


class _Schedule:
    """Every client's steps, fixed before training: `indices[k, t, :sizes[k, t]]` is client k's
    batch at step t as indices into the pool (size 0 once it has no steps left), `rates[k, t]` its
    learning rate there, and `last_epoch[k, t]` whether that step counts towards its reported loss."""

    def __init__(self, client_indices: list[torch.Tensor], settings: OptimizerConfig, seeds: list[int], dtype: torch.dtype) -> None:
        # Built on the CPU and moved to the device once: filling a device tensor batch by batch
        # would launch one small copy per client and step.
        device = client_indices[0].device
        per_client = []
        for indices, seed in zip(client_indices, seeds):
            order = torch.Generator().manual_seed(seed)  # the generator sgd_train draws the batch order from
            on_host = indices.cpu()
            per_client.append([
                on_host[batch]
                for _ in range(settings.epochs)
                for batch in shuffled_batches(len(indices), settings.batch_size, order, torch.device("cpu"))
            ])
        clients, most_steps = len(per_client), max((len(batches) for batches in per_client), default=0)
        self.step_sizes = [[len(batch) for batch in batches] + [0] * (most_steps - len(batches)) for batches in per_client]
        self.sizes = torch.tensor(self.step_sizes, dtype=torch.long).view(clients, most_steps)
        indices_on_host = torch.zeros(clients, most_steps, settings.batch_size, dtype=torch.long)
        rates = torch.zeros(clients, most_steps, dtype=torch.float64)
        last_epoch = torch.zeros(clients, most_steps, dtype=torch.bool)
        for k, batches in enumerate(per_client):
            steps = len(batches)
            for t, batch in enumerate(batches):
                indices_on_host[k, t, : len(batch)] = batch
            rates[k, :steps] = _learning_rates(settings, steps)
            last_epoch[k, steps - steps // max(settings.epochs, 1) : steps] = True
        self.indices = indices_on_host.to(device)
        self.rates = rates.to(dtype=dtype, device=device)
        self.last_epoch = last_epoch.to(device)
        self.last_epoch_samples = (self.sizes * last_epoch).sum(1)

    def groups(self, step: int) -> dict[int, list[int]]:
        """The clients that train at `step`, by the size of their batch."""
        by_size: dict[int, list[int]] = defaultdict(list)
        for k, sizes in enumerate(self.step_sizes):
            if size := sizes[step]:
                by_size[size].append(k)
        return by_size


def train_stacked(
    model: nn.Module, states: list[StateDict], pool: ImageSplit, client_indices: list[torch.Tensor],
    settings: OptimizerConfig, seeds: list[int],
) -> list[tuple[StateDict, TrainOutcome]]:
    """Train one copy of `model` per client with cross-entropy on `pool[client_indices[k]]`,
    starting from `states[k]`, all at once; the same result as `sgd_train` on each client alone
    (within float tolerance). Returns each client's final state and outcome, in order."""
    if not states:
        return []
    model.train()
    keys = list(model.state_dict())
    parameter_names = [name for name, _ in model.named_parameters()]
    buffer_names = [name for name, _ in model.named_buffers()]
    device = pool.images.device
    params = {n: torch.stack([s[n] for s in states]).to(device) for n in parameter_names}
    buffers = {n: torch.stack([s[n] for s in states]).to(device) for n in buffer_names}
    velocity = {n: torch.zeros_like(p) for n, p in params.items()} if settings.momentum else {}
    schedule = _Schedule(client_indices, settings, seeds, pool.images.dtype)
    loss_sums = torch.zeros(len(states), dtype=pool.images.dtype, device=device)  # over each client's last epoch

    def batch_loss(p: StateDict, b: StateDict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (images,)), labels)

    step_all = vmap(grad_and_value(batch_loss))
    everyone = list(range(len(states)))
    rows_of: dict[tuple[int, ...], torch.Tensor] = {}  # made once per group: a copy to a GPU waits for it
    for step in range(schedule.sizes.shape[1]):
        for size, clients in schedule.groups(step).items():
            key = tuple(clients)
            if key not in rows_of:
                rows_of[key] = torch.tensor(clients, device=device)
            rows = rows_of[key]
            pick = (lambda t: t) if clients == everyone else (lambda t: t[rows])
            p, b, v = ({n: pick(t) for n, t in group.items()} for group in (params, buffers, velocity))
            batch = pick(schedule.indices[:, step, :size])
            grads, losses = step_all(p, b, pool.images[batch], pool.labels[batch])
            _sgd_step(p, grads, v, pick(schedule.rates[:, step]), settings)
            if clients != everyone:  # the picked rows were copies: write them back
                for group, picked in ((params, p), (buffers, b), (velocity, v)):
                    for n, t in picked.items():
                        group[n][rows] = t
            loss_sums.index_add_(0, rows, losses.detach() * size * pick(schedule.last_epoch[:, step]))
    results = []
    for k in range(len(states)):
        state = {n: (params[n][k] if n in params else buffers[n][k]).detach().clone() for n in keys}
        counted = int(schedule.last_epoch_samples[k])
        loss = float(loss_sums[k] / counted) if counted else float("nan")
        results.append((state, TrainOutcome(loss, int(schedule.sizes[k].sum()))))
    return results


def _learning_rates(settings: OptimizerConfig, steps: int) -> torch.Tensor:
    """A client's learning rate at each of its `steps` steps, as `torch.optim.lr_scheduler.CosineAnnealingLR`
    over them would set it, or the constant rate."""
    if settings.lr_schedule == "constant":
        return torch.full((steps,), settings.lr, dtype=torch.float64)
    return torch.tensor([settings.lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)], dtype=torch.float64)


def _sgd_step(params: StateDict, grads: StateDict, velocity: StateDict, lr: torch.Tensor, settings: OptimizerConfig) -> None:
    """One `torch.optim.SGD` step on stacked parameters, in place, with a learning rate per client."""
    for name, p in params.items():
        g = grads[name]
        if settings.weight_decay:
            g = g.add(p, alpha=settings.weight_decay)
        if settings.momentum:
            g = velocity[name].mul_(settings.momentum).add_(g)
        p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * g)
