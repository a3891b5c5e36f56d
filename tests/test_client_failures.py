"""Unreliable and hostile clients: dropout, clients that raise, invalid updates, norm clipping.

Every invalid update is checked against the round run without it: the server state must be
bit-identical, as if that client had not replied.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import BASE
from helpers import DIGITS as DIGITS_DATA

from koala.aggregate import clip_update, update_distance
from koala.algorithms import RoundMetrics
from koala.algorithms.client import local_train
from koala.config import load_config
from koala.engine.dispatch import Replies
from koala.engine.local import local_dispatch
from koala.run.experiment import Experiment, prepare_experiment
from koala.run.loop import complete_round, run_experiment
from koala.sampling import unreachable_clients
from koala.seeding import derive_seed
from koala.state import ClientTask, ClientUpdate, ServerState, StateDict

DIGITS = [*DIGITS_DATA, "models.large='lenet'", "models.small=['lenet']", "client.lr=0.05", "rounds=2"]


def _experiment(*overrides: str) -> Experiment:
    return prepare_experiment(load_config(BASE, [*DIGITS, *overrides]))


def _run(tmp_path: Path, experiment: Experiment, dispatch=None) -> tuple[list[dict], list[str]]:
    printed: list[str] = []
    result = run_experiment(experiment, dispatch or local_dispatch(experiment.algorithm, experiment.split), tmp_path / "run", echo=printed.append)
    return result.metrics, printed


def test_dropped_clients_are_left_out_and_cost_nothing(tmp_path: Path) -> None:
    experiment = _experiment("data.num-clients=8", "client.dropout-probability=0.5", "rounds=3")
    metrics, printed = _run(tmp_path, experiment)
    dropped_total = 0
    for line in metrics[1:]:
        dropped = unreachable_clients(0, line["round"], list(range(8)), 0.5)
        dropped_total += len(dropped)
        assert [f["client"] for f in line.get("failed", [])] == dropped
        assert all("client.dropout-probability = 0.5" in f["reason"] for f in line.get("failed", []))
        assert line["accepted"] == 8 - len(dropped)
        assert sorted(c["client"] for c in line["resources"]["per-client"]) == sorted(set(range(8)) - set(dropped))
    assert 0 < dropped_total < 24
    assert any("failed: unreachable this round" in text for text in printed)


def test_dropout_draws_are_seeded_and_independent_of_other_streams() -> None:
    clients = list(range(100))
    first = unreachable_clients(0, 1, clients, 0.3)
    assert first == unreachable_clients(0, 1, clients, 0.3)
    assert first != unreachable_clients(0, 2, clients, 0.3) and first != unreachable_clients(1, 1, clients, 0.3)
    assert 15 < len(first) < 45
    assert unreachable_clients(0, 1, clients, 0.0) == []


def _failing(client_ids: set[int]) -> Callable:
    def client_step(task, data, config, spec, seed):
        if task.client_id in client_ids:
            raise RuntimeError("battery died")
        return local_train(task, data, config, spec, seed)

    return client_step


def test_a_client_that_raises_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    experiment = _experiment("data.num-clients=4", "client.epochs=3")
    metrics, printed = _run(tmp_path, experiment, local_dispatch(experiment.algorithm, experiment.split, _failing({1})))
    for line in metrics[1:]:
        assert line["failed"] == [{"client": 1, "reason": "the client raised RuntimeError: battery died"}]
        assert line["accepted"] == 3 and "skipped" not in line
        sent_to_1 = [c for c in line["resources"]["per-client"] if c["client"] == 1]
        assert sent_to_1 and sent_to_1[0]["bytes-up"] == 0 and sent_to_1[0]["bytes-down"] > 0
    assert "  client 1 failed: the client raised RuntimeError: battery died" in printed
    accuracy = [line["eval"]["small:lenet"]["accuracy"] for line in metrics]
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy  # the three healthy clients still learn


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({}, "trained-samples = None"),
        ({"train-loss": 0.5}, "trained-samples = None"),
        ({"train-loss": 0.5, "trained-samples": float("inf")}, "trained-samples = inf"),
        ({"train-loss": 0.5, "trained-samples": 2.5}, "trained-samples = 2.5"),
        ({"train-loss": 0.5, "trained-samples": -1}, "trained-samples = -1"),
        ({"train-loss": "low", "trained-samples": 3}, "train-loss = 'low'"),
        ({"train-loss": 0.5, "trained-samples": 3, "accuracy": [1.0, 2.0]}, "non-numeric metrics ['accuracy']"),
    ],
)
def test_a_reply_with_bad_metrics_is_recorded_as_failed(metrics: dict, message: str) -> None:
    task = ClientTask(2, "lenet", {"w": torch.zeros(2)})
    replies = Replies()
    replies.received(task, ClientUpdate(2, "lenet", {"w": torch.ones(2)}, 10, metrics))
    assert replies.updates == [] and len(replies.failures) == 1
    assert message in replies.failures[0]["reason"]
    assert [(e.client_id, e.bytes_up) for e in replies.exchanges] == [(2, 0)]


def test_a_local_client_with_bad_metrics_fails_and_the_run_goes_on(tmp_path: Path) -> None:
    def no_metrics(task, data, config, spec, seed):
        update = local_train(task, data, config, spec, seed)
        return replace(update, metrics={}) if task.client_id == 0 else update

    experiment = _experiment("data.num-clients=4", "rounds=1")
    metrics, _ = _run(tmp_path, experiment, local_dispatch(experiment.algorithm, experiment.split, no_metrics))
    assert metrics[1]["failed"] == [{"client": 0, "reason": "client 0 reported trained-samples = None; expected a whole number >= 0"}]
    assert metrics[1]["accepted"] == 3


def test_too_few_replies_skip_the_round_and_leave_the_server_unchanged(tmp_path: Path) -> None:
    experiment = _experiment("data.num-clients=4", "client.min-replies=3")
    metrics, printed = _run(tmp_path, experiment, local_dispatch(experiment.algorithm, experiment.split, _failing({0, 2})))
    for line in metrics[1:]:
        assert line["accepted"] == 2 and "fewer than client.min-replies = 3" in line["skipped"]
        assert line["eval"] == metrics[0]["eval"]
        assert line["resources"]["server-flops"] == 0
    assert any("SKIPPED" in text for text in printed)


# -- invalid updates ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def round_inputs() -> tuple[Experiment, ServerState, list[ClientUpdate]]:
    """A KOALA experiment, its start state and the real updates of clients 0, 1 and 2 in round 1."""
    experiment = _experiment("data.num-clients=4", "rounds=1")
    state = experiment.algorithm.initial_state(RoundMetrics())
    updates = []
    for cid in range(3):
        task = experiment.algorithm.client_task(state, cid)
        updates.append(local_train(task, experiment.split.client_data(cid), experiment.config, experiment.spec,
                                   derive_seed(0, "client", 1, cid)))
    return experiment, state, updates


def _with_tensor(update: ClientUpdate, name: str, change: Callable[[torch.Tensor], torch.Tensor | None]) -> ClientUpdate:
    state = dict(update.state)
    changed = change(state[name].clone())
    if changed is None:
        del state[name]
    else:
        state[name] = changed
    return replace(update, state=state)


def _poisoned(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[0] = value
        return tensor

    return change


FIRST = "features.0.weight"
INVALID = {
    "nan": (lambda u: _with_tensor(u, FIRST, _poisoned(float("nan"))), "holds NaN or Inf values"),
    "inf": (lambda u: _with_tensor(u, FIRST, _poisoned(float("inf"))), "holds NaN or Inf values"),
    "missing-tensor": (lambda u: _with_tensor(u, FIRST, lambda t: None), "missing ['features.0.weight']"),
    "extra-tensor": (lambda u: replace(u, state={**u.state, "backdoor": torch.ones(3)}), "unexpected ['backdoor']"),
    "wrong-shape": (lambda u: _with_tensor(u, FIRST, lambda t: t[:1]), "expected (16, 1, 3, 3)"),
    "wrong-dtype": (lambda u: _with_tensor(u, FIRST, lambda t: t.double()), "torch.float64, expected (16, 1, 3, 3) torch.float32"),
    "unassigned-architecture": (lambda u: replace(u, architecture="mobilenetv2"), "sent architecture 'mobilenetv2' but was assigned 'lenet'"),
    "zero-examples": (lambda u: replace(u, num_examples=0), "reported 0 examples; expected a positive integer"),
    "negative-examples": (lambda u: replace(u, num_examples=-5), "reported -5 examples"),
    "fractional-examples": (lambda u: replace(u, num_examples=2.5), "reported 2.5 examples"),
    "boolean-examples": (lambda u: replace(u, num_examples=True), "reported True examples"),
    "inflated-examples": (lambda u: replace(u, num_examples=10**12), "reported 1000000000000 examples but holds"),
    "deflated-examples": (lambda u: replace(u, num_examples=u.num_examples - 1), "an update must report the size of its own data"),
    "inflated-trained-samples": (lambda u: replace(u, metrics={**u.metrics, "trained-samples": 10**12}),
                                 "reported trained-samples = 1000000000000, but 1 epoch(s)"),
    "not-sampled": (lambda u: replace(u, client_id=3), "client 3 was not asked for an update this round"),
    "second-reply": (lambda u: replace(u, client_id=1), "client 1 replied more than once this round"),
}


def _assert_same_state(a: ServerState, b: ServerState) -> None:
    assert a.round == b.round
    pairs: list[tuple[StateDict, StateDict]] = [(a.large, b.large), *((a.small[k], b.small[k]) for k in a.small)]
    assert a.small.keys() == b.small.keys()
    for x, y in pairs:
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kind", sorted(INVALID))
def test_an_invalid_update_is_rejected_and_the_server_state_is_as_if_it_never_came(round_inputs, kind: str) -> None:
    experiment, state, (first, second, third) = round_inputs
    corrupt, reason = INVALID[kind]
    without, line_without = complete_round(experiment, state, [0, 1, 2], Replies(updates=[first, second]))
    with_bad, line = complete_round(experiment, state, [0, 1, 2], Replies(updates=[first, second, corrupt(third)]))
    _assert_same_state(with_bad, without)
    assert {k: v for k, v in line.items() if k in ("examples", "train-loss", "accepted")} == \
        {k: v for k, v in line_without.items() if k in ("examples", "train-loss", "accepted")}
    assert line["accepted"] == 2 and len(line["rejected"]) == 1
    assert reason in line["rejected"][0]["reason"]
    # and the valid third update does change the result: the comparison above can fail
    with_third, _ = complete_round(experiment, state, [0, 1, 2], Replies(updates=[first, second, third]))
    assert not torch.equal(with_third.large[FIRST], without.large[FIRST])


@pytest.mark.parametrize("why", ["unreachable this round (simulated: client.dropout-probability = 0.5)",
                                 "the client raised RuntimeError: out of memory"])
def test_an_update_from_a_client_recorded_as_failed_or_dropped_is_rejected(round_inputs, why: str) -> None:
    # e.g. a late reply from a node already written off: the round is as if it never came
    experiment, state, (first, second, third) = round_inputs
    without, _ = complete_round(experiment, state, [0, 1, 2], Replies(updates=[first, second]))
    replies = Replies(updates=[first, second, third])
    replies.fail(2, why)
    with_late, line = complete_round(experiment, state, [0, 1, 2], replies)
    _assert_same_state(with_late, without)
    assert line["accepted"] == 2 and line["failed"] == [{"client": 2, "reason": why}]
    assert line["rejected"] == [{"client": 2, "reason": "client 2 was not asked for an update this round"}]


def test_a_rejected_updates_claimed_training_is_not_counted_in_the_ledger(round_inputs) -> None:
    # bytes up still count (they were sent); the FLOPs a rejected client claims do not
    experiment, state, (first, second, third) = round_inputs
    inflated = replace(third, num_examples=10**12, metrics={**third.metrics, "trained-samples": 10**12})
    lines = {}
    for name, reply in (("honest", third), ("inflated", inflated)):
        replies = Replies()
        for update in (first, second, reply):
            replies.received(experiment.algorithm.client_task(state, update.client_id), update)
        lines[name] = complete_round(experiment, state, [0, 1, 2], replies)[1]["resources"]
    honest, inflated_line = lines["honest"], lines["inflated"]
    third_flops = next(c["flops"] for c in honest["per-client"] if c["client"] == 2)
    assert third_flops > 0 and inflated_line["client-flops"] == honest["client-flops"] - third_flops
    assert inflated_line["bytes-up"] == honest["bytes-up"] and inflated_line["replies"] == 3


def test_clipping_scales_the_change_to_the_limit_and_keeps_its_direction(round_inputs) -> None:
    experiment, state, (update, *_) = round_inputs
    reference = state.small["lenet"]
    norm = update_distance(update, reference)
    clipped = clip_update(update, reference, norm / 4)
    assert update_distance(clipped, reference) == pytest.approx(norm / 4, rel=1e-5)
    for name, ref in reference.items():
        if ref.is_floating_point():
            torch.testing.assert_close(clipped.state[name] - ref, (update.state[name] - ref) / 4, rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(clipped.state[name], update.state[name])


def test_updates_above_client_max_update_norm_are_clipped_and_recorded(round_inputs) -> None:
    experiment, state, updates = round_inputs
    norms = [update_distance(u, state.small["lenet"]) for u in updates]
    limit = sorted(norms)[1]  # the largest update is clipped, the others are not
    clipping = replace(experiment, algorithm=type(experiment.algorithm)(
        experiment.config.model_copy(update={"client": experiment.config.client.model_copy(update={"max_update_norm": limit})}),
        experiment.spec, experiment.algorithm.server_data, experiment.device,
    ))
    metrics = RoundMetrics()
    accepted = clipping.algorithm.accept_updates(state, [0, 1, 2], updates, metrics)
    largest = max(range(3), key=norms.__getitem__)
    assert metrics.clipped == [{"client": largest, "norm": norms[largest]}]
    assert update_distance(accepted[largest], state.small["lenet"]) == pytest.approx(limit, rel=1e-5)
    for i in set(range(3)) - {largest}:
        assert accepted[i] is updates[i]


def test_a_run_with_client_max_update_norm_records_and_prints_the_clipped_updates(tmp_path: Path) -> None:
    experiment = _experiment("data.num-clients=4", "rounds=1", "client.max-update-norm=0.01")
    metrics, printed = _run(tmp_path, experiment)
    clipped = metrics[1]["clipped"]
    assert [entry["client"] for entry in clipped] == [0, 1, 2, 3] and all(e["norm"] > 0.01 for e in clipped)
    assert any(text.startswith("  client 0 clipped: update norm") for text in printed)
    assert "clipped 4" in printed[2]
