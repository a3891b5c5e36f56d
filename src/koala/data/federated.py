"""The federated split: a server proxy set disjoint from client data, client shards, the test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from koala.config import DataConfig
from koala.data.dataset import DataSource, ImageSplit
from koala.data.partition import (
    label_skew,
    partition_dirichlet,
    partition_iid,
    partition_k_labels,
)
from koala.data.sources import load_source
from koala.errors import DataError
from koala.models.registry import InputSpec
from koala.seeding import numpy_generator


@dataclass(frozen=True)
class FederatedSplit:
    """Who holds which data. Client shards index into `client_pool`; nothing is copied per client."""

    proxy_images: torch.Tensor
    labelled_server: ImageSplit | None
    client_pool: ImageSplit
    client_indices: list[torch.Tensor]
    test: ImageSplit
    num_classes: int
    label_skew: float
    validation: ImageSplit | None = None
    """Training images held out from everything else, to choose settings on (`data.validation-size`)."""

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def client_data(self, client_id: int) -> ImageSplit:
        """The private training data of one client."""
        return self.client_pool.subset(self.client_indices[client_id])

    @property
    def input_spec(self) -> InputSpec:
        """The shape of the images and the number of classes, which every model is built for."""
        _, channels, size, _ = self.client_pool.images.shape
        return InputSpec(int(channels), int(size), self.num_classes)

    def client_sizes(self) -> list[int]:
        return [int(len(i)) for i in self.client_indices]

    def to(self, device: torch.device | str) -> FederatedSplit:
        """The same split with every tensor moved once to `device`."""

        def move(split: ImageSplit | None) -> ImageSplit | None:
            return None if split is None else ImageSplit(split.images.to(device), split.labels.to(device))

        return FederatedSplit(
            proxy_images=self.proxy_images.to(device),
            labelled_server=move(self.labelled_server),
            client_pool=move(self.client_pool),
            client_indices=[i.to(device) for i in self.client_indices],
            test=move(self.test),
            num_classes=self.num_classes,
            label_skew=self.label_skew,
            validation=move(self.validation),
        )

    def describe(self) -> dict[str, object]:
        """Sizes and skew, for the run directory and the progress header."""
        sizes = self.client_sizes()
        return {
            "proxy": int(self.proxy_images.shape[0]),
            "labelled-server": 0 if self.labelled_server is None else len(self.labelled_server),
            "clients": self.num_clients,
            "client-examples": int(sum(sizes)),
            "client-size-min": int(min(sizes)),
            "client-size-max": int(max(sizes)),
            "label-skew": round(self.label_skew, 4),
            "test": len(self.test),
            **({"validation": len(self.validation)} if self.validation is not None else {}),
        }


def _limit(split: ImageSplit, limit: int, rng: np.random.Generator) -> ImageSplit:
    if limit == 0 or limit >= len(split):
        return split
    return split.subset(torch.from_numpy(np.sort(rng.permutation(len(split))[:limit])))


def _partition(labels: np.ndarray, config: DataConfig, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    if config.partition == "iid":
        return partition_iid(len(labels), config.num_clients, rng)
    if config.partition == "dirichlet":
        return partition_dirichlet(labels, config.num_clients, config.alpha, rng, config.min_client_size)
    return partition_k_labels(labels, config.num_clients, config.labels_per_client, rng)


def load_federated_split(config: DataConfig, seed: int, directory: str = "") -> FederatedSplit:
    """The federated split of the data set `config` names, read from `directory` (else `config.dir`,
    else the data set's default). The local engine and every Flower ClientApp take their clients'
    shards from it (`FederatedSplit.client_data`), so a client holds the same data in every engine."""
    directory = directory or config.dir
    source = load_source(config.dataset, Path(directory).expanduser() if directory else None)
    return make_federated_split(source, config, seed)


def make_federated_split(source: DataSource, config: DataConfig, seed: int) -> FederatedSplit:
    """Split `source` as `config` asks, drawing only from streams derived from `seed`.

    First `validation_size` training images are held out (a stream of their own). A seeded
    permutation of the rest puts the proxy set at its head (`proxy_size` images, else
    `proxy_fraction` of them; its first `proxy_labelled` keep their labels as the labelled server
    set) and the clients' images at its tail (the last `client_size`, else all the rest), which are
    partitioned over the clients: for a fixed `client_size` the clients hold the same images, split
    the same way, whatever the proxy size. The official test split is used for evaluation.
    """
    train = _limit(source.train, config.train_limit, numpy_generator(seed, "data", "train-limit"))
    test = _limit(source.test, config.test_limit, numpy_generator(seed, "data", "test-limit"))
    train, validation = _hold_out(train, config.validation_size, numpy_generator(seed, "data", "validation"))
    order = torch.from_numpy(numpy_generator(seed, "data", "proxy").permutation(len(train)))
    num_proxy = config.proxy_size or max(1, round(config.proxy_fraction * len(train)))
    if config.proxy_labelled > num_proxy:
        raise DataError(
            f"data.proxy-labelled = {config.proxy_labelled} but the proxy set holds only {num_proxy} "
            "images: lower data.proxy-labelled or raise data.proxy-fraction (or data.proxy-size)"
        )
    num_pool = config.client_size or len(train) - num_proxy
    if num_proxy + num_pool > len(train):
        raise DataError(
            f"the proxy set ({num_proxy} images) and the clients (data.client-size = {num_pool}) need "
            f"{num_proxy + num_pool} training images but {len(train)} remain after the validation split "
            f"(data.validation-size = {config.validation_size}): lower data.proxy-size or data.client-size"
        )
    pool = train.subset(order[len(train) - num_pool:])
    if len(pool) < config.num_clients:
        raise DataError(
            f"{len(pool)} training image(s) remain for {config.num_clients} clients after the proxy set: "
            "lower data.num-clients or data.proxy-fraction, or raise data.train-limit"
        )
    proxy = train.subset(order[:num_proxy])
    labelled = proxy.subset(torch.arange(config.proxy_labelled)) if config.proxy_labelled else None
    labels = pool.labels.numpy()
    shards = _partition(labels, config, source.num_classes, numpy_generator(seed, "data", "partition"))
    return FederatedSplit(
        proxy_images=proxy.images,
        labelled_server=labelled,
        client_pool=pool,
        client_indices=[torch.from_numpy(s).long() for s in shards],
        test=test,
        num_classes=source.num_classes,
        label_skew=label_skew(labels, shards, source.num_classes),
        validation=validation,
    )


def _hold_out(train: ImageSplit, size: int, rng: np.random.Generator) -> tuple[ImageSplit, ImageSplit | None]:
    """(the training images left, `size` of them held out at random), in their original order."""
    if size == 0:
        return train, None
    if size >= len(train):
        raise DataError(
            f"data.validation-size = {size} but the training split holds only {len(train)} images: "
            "lower data.validation-size (or raise data.train-limit)"
        )
    held = np.zeros(len(train), dtype=bool)
    held[rng.permutation(len(train))[:size]] = True
    return train.subset(torch.from_numpy(np.flatnonzero(~held))), train.subset(torch.from_numpy(np.flatnonzero(held)))
