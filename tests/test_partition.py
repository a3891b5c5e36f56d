"""Partitioners and the federated split: sizes, disjointness, the effect of alpha, label skew."""

import numpy as np
import pytest
import torch

from koala.config import DataConfig
from koala.data.dataset import DataSource, ImageSplit
from koala.data.federated import make_federated_split
from koala.data.partition import (
    label_skew,
    partition_dirichlet,
    partition_iid,
    partition_k_labels,
)
from koala.errors import DataError

LABELS = np.repeat(np.arange(10), 300)  # 3,000 examples, 300 per class


def _covers_exactly(shards: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(shards)
    return len(joined) == n and len(np.unique(joined)) == n


def test_iid_sizes_and_low_skew() -> None:
    shards = partition_iid(len(LABELS), 7, np.random.default_rng(0))
    assert _covers_exactly(shards, len(LABELS))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(LABELS, shards, 10) < 0.1


def test_dirichlet_alpha_controls_skew() -> None:
    skews = {}
    for alpha in (0.1, 0.5, 100.0):
        shards = partition_dirichlet(LABELS, 10, alpha, np.random.default_rng(0), min_size=10)
        assert _covers_exactly(shards, len(LABELS))
        assert min(len(s) for s in shards) >= 10
        skews[alpha] = label_skew(LABELS, shards, 10)
    assert skews[0.1] > skews[0.5] > skews[100.0]
    assert skews[100.0] < 0.1 and skews[0.1] > 0.5


def test_dirichlet_is_seeded() -> None:
    a = partition_dirichlet(LABELS, 10, 0.5, np.random.default_rng(3))
    b = partition_dirichlet(LABELS, 10, 0.5, np.random.default_rng(3))
    c = partition_dirichlet(LABELS, 10, 0.5, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_with_a_tiny_alpha_redraws_instead_of_dividing_by_zero() -> None:
    # With alpha = 0.01 a class's whole mass often falls on clients that are already full; such a
    # draw is redrawn (it used to turn the proportions into NaN and the shards into garbage).
    with np.errstate(all="raise"):
        shards = partition_dirichlet(LABELS, 10, 0.01, np.random.default_rng(0), min_size=250)
    assert _covers_exactly(shards, len(LABELS)) and min(len(s) for s in shards) >= 250


def test_dirichlet_impossible_minimum() -> None:
    with pytest.raises(DataError, match="at least 10 examples each"):
        partition_dirichlet(LABELS[:50], 10, 0.5, np.random.default_rng(0), min_size=10)


def test_k_labels_gives_each_client_k_classes() -> None:
    shards = partition_k_labels(LABELS, 20, 2, np.random.default_rng(0))
    assert _covers_exactly(shards, len(LABELS))
    assert all(len(np.unique(LABELS[s])) == 2 for s in shards)
    with pytest.raises(DataError, match="only 10 classes"):
        partition_k_labels(LABELS, 5, 11, np.random.default_rng(0))


def test_label_skew_extremes() -> None:
    disjoint = [np.flatnonzero(LABELS == c) for c in range(10)]
    assert label_skew(LABELS, disjoint, 10) == pytest.approx(0.9)
    assert label_skew(LABELS, [np.arange(len(LABELS))], 10) == pytest.approx(0.0)


def _source(n: int = 2000) -> DataSource:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    train = ImageSplit(torch.randn(n, 1, 8, 8, generator=g), labels)
    return DataSource("toy", train, ImageSplit(torch.randn(100, 1, 8, 8, generator=g), torch.arange(100) % 10), 10)


def test_federated_split_keeps_proxy_disjoint_from_clients() -> None:
    source = _source()
    config = DataConfig(num_clients=8, proxy_fraction=0.25, proxy_labelled=50)
    split = make_federated_split(source, config, seed=0)
    assert split.proxy_images.shape[0] == 500 and len(split.labelled_server) == 50
    assert torch.equal(split.labelled_server.images, split.proxy_images[:50])
    client_images = torch.cat([split.client_data(i).images for i in range(8)])
    assert client_images.shape[0] == 1500
    # every image is distinct (random normal), so disjointness is checked on the pixels themselves
    everything = torch.cat([split.proxy_images, client_images]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == 2000
    assert split.describe()["label-skew"] == pytest.approx(split.label_skew, abs=1e-4)


def test_federated_split_is_seeded() -> None:
    source, config = _source(), DataConfig(num_clients=8)
    a, b = make_federated_split(source, config, 1), make_federated_split(source, config, 1)
    c = make_federated_split(source, config, 2)
    assert torch.equal(a.proxy_images, b.proxy_images)
    assert all(torch.equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert not torch.equal(a.proxy_images, c.proxy_images)


def test_federated_split_rejects_impossible_requests() -> None:
    source = _source(200)
    with pytest.raises(DataError, match="remain for 500 clients"):
        make_federated_split(source, DataConfig(num_clients=500, partition="iid"), 0)
    with pytest.raises(DataError, match="proxy set holds only 20 images"):
        make_federated_split(source, DataConfig(num_clients=2, proxy_labelled=21), 0)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.flatten(1)}


def test_validation_split_is_disjoint_from_proxy_clients_and_test() -> None:
    source = _source()
    config = DataConfig(num_clients=8, validation_size=300, proxy_size=400, proxy_labelled=50)
    split = make_federated_split(source, config, seed=0)
    assert split.validation is not None and len(split.validation) == 300
    client_images = torch.cat([split.client_data(i).images for i in range(8)])
    assert split.proxy_images.shape[0] == 400 and client_images.shape[0] == 2000 - 300 - 400
    validation, proxy, clients, test = (_rows(x) for x in (split.validation.images, split.proxy_images, client_images,
                                                          split.test.images))
    assert not validation & proxy and not validation & clients and not validation & test
    assert len(validation | proxy | clients) == 2000  # nothing lost, nothing twice
    assert split.describe()["validation"] == 300
    # labels travel with their images
    truth = {row.numpy().tobytes(): int(label) for row, label in zip(source.train.images.flatten(1), source.train.labels)}
    assert all(truth[row.numpy().tobytes()] == int(label)
               for row, label in zip(split.validation.images.flatten(1), split.validation.labels))


def test_no_validation_split_leaves_the_split_as_it_was() -> None:
    source = _source()
    split = make_federated_split(source, DataConfig(num_clients=8), seed=3)
    assert split.validation is None and "validation" not in split.describe()
    # the proxy set is the head of the seeded permutation, the clients the rest, as before the key existed
    assert split.proxy_images.shape[0] == 200 and split.client_pool.images.shape[0] == 1800


def test_client_size_keeps_the_same_client_data_for_every_proxy_size() -> None:
    source = _source()
    shards = []
    for proxy_size in (100, 400, 800):
        config = DataConfig(num_clients=5, validation_size=200, proxy_size=proxy_size, client_size=1000)
        split = make_federated_split(source, config, seed=1)
        assert split.proxy_images.shape[0] == proxy_size and len(split.client_pool) == 1000
        shards.append([_rows(split.client_data(i).images) for i in range(5)])
        assert not _rows(split.proxy_images) & set().union(*shards[-1])
    assert shards[0] == shards[1] == shards[2]


def test_validation_and_sizes_that_do_not_fit_are_refused() -> None:
    source = _source(200)
    with pytest.raises(DataError, match="data.validation-size = 200 but the training split holds only 200"):
        make_federated_split(source, DataConfig(num_clients=2, validation_size=200), 0)
    with pytest.raises(DataError, match="need 190 training images but 150 remain after the validation split"):
        make_federated_split(source, DataConfig(num_clients=2, validation_size=50, proxy_size=40, client_size=150), 0)
