"""The Flower engines with real processes on loopback: a SuperLink and SuperNodes (plain and TLS), a
SuperNode killed mid-round, and the simulation engine against the local engine."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402  (installed with flwr)
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from interruption import interrupt_run  # noqa: E402

from koala.algorithms.client import local_train  # noqa: E402
from koala.cli import main  # noqa: E402
from koala.config import load_config  # noqa: E402
from koala.engine.dispatch import Replies  # noqa: E402
from koala.engine.flower.client_app import _check_partition, node_partition  # noqa: E402
from koala.engine.flower.messages import (  # noqa: E402
    read_reply,
    read_train,
    reply_content,
    train_content,
)
from koala.engine.local import local_dispatch  # noqa: E402
from koala.errors import ConfigError, UpdateRejected  # noqa: E402
from koala.run.experiment import prepare_experiment  # noqa: E402
from koala.run.launch import run_local  # noqa: E402
from koala.run.loop import run_experiment  # noqa: E402
from koala.run.run_dir import read_metrics, without_times  # noqa: E402
from koala.state import (
    ClientTask,  # noqa: E402
    ClientUpdate,  # noqa: E402
)

APP = Path(__file__).resolve().parent.parent / "flower-app"
BIN = Path(sys.executable).parent
FMNIST_THREE_CLIENTS = """
name = "flower-test"
rounds = 2
threads = 1
[data]
dataset = "fashion-mnist"
train-limit = 3000
test-limit = 1000
num-clients = 3
partition = "iid"
proxy-fraction = 0.2
min-client-size = 50
[models]
large = "resnet18-ds"
small = ["lenet", "shufflenetv2-0.5"]
assignment = ["lenet", "shufflenetv2-0.5", "lenet"]
[client]
epochs = 2
lr = 0.05
[distill.reverse]
epochs = 3
lr = 0.05
[distill.forward]
lr = 0.05
[flower]
node-timeout = 120
round-timeout = 180
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_node_key(path: Path) -> Path:
    """A SuperNode's EC key pair, as `ssh-keygen -t ecdsa -b 384` writes it; returns the public key."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public = path.with_suffix(".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return public


def _write_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost, written by `koala certs` as a user would."""
    assert main(["certs", "--address", "127.0.0.1", "--address", "localhost", "--out", str(directory / "certs")]) == 0
    return {"ca": directory / "certs" / "ca.pem", "cert": directory / "certs" / "server.pem",
            "key": directory / "certs" / "server.key"}


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own process group, all stopped by PID.
    `secure`: TLS with certificates made here, and SuperNode authentication (only registered keys join)."""

    def __init__(self, root: Path, secure: bool) -> None:
        self.root, self.port = root, _free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.certs = _write_certificates(root) if secure else None
        security = f'root-certificates = "{self.certs["ca"]}"' if self.certs else "insecure = true"
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        )

    def _security(self, role: str) -> list[str]:
        if not self.certs:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                    "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]
        return ["--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(self.root / role)]

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start(self, num_nodes: int) -> None:
        self._start("superlink", [str(BIN / "flower-superlink"), *self._security("superlink"),
                                  "--disable-runtime-dependency-installation", "--port", str(self.port)])
        self._wait_for_superlink()
        for partition in range(num_nodes):
            name = f"node{partition}"
            if self.certs:
                self.register(_write_node_key(self.root / name))
            self._start(name, self.supernode_command(name, partition, num_nodes))

    def supernode_command(self, name: str, partition: int, num_nodes: int) -> list[str]:
        return [str(BIN / "flower-supernode"), *self._security(name), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(_free_port()), "--node-config", f"partition-id={partition} num-partitions={num_nodes}"]

    def register(self, public_key: Path) -> None:
        result = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "test"], env=self.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "registered successfully" in result.stdout, result.stdout + result.stderr

    def _wait_for_superlink(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the SuperLink did not open its port\n" + self.logs()
                assert self.processes["superlink"].poll() is None, "the SuperLink exited\n" + self.logs()
                time.sleep(0.2)

    def run(self, config: Path, out: Path, timeout: float = 420, app: Path = APP) -> subprocess.CompletedProcess:
        command = [str(BIN / "flwr"), "run", str(app), "test", "--stream",
                   "--run-config", f'config="{config}" out="{out}"']
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started."""
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(name)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Federation]:
    federation = Federation(tmp_path, secure=getattr(request, "param", False))
    try:
        yield federation
    finally:
        federation.stop()


def _experiment(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(FMNIST_THREE_CLIENTS + extra)
    return path


@pytest.mark.integration
@pytest.mark.parametrize("federation", [False, True], ids=["insecure", "tls-and-node-auth"], indirect=True)
def test_deployment_runs_koala_over_a_superlink_and_three_supernodes(federation: Federation, tmp_path: Path) -> None:
    federation.start(num_nodes=3)
    out = tmp_path / "run"
    result = federation.run(_experiment(tmp_path), out)
    assert result.returncode == 0, result.stdout + result.stderr + federation.logs()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["mode"] == "heterogeneous"
    assert summary["small"] == {"lenet": 2, "shufflenetv2-0.5": 1}
    assert summary["final"]["large"]["accuracy"] > 0.4  # ten classes: chance is 0.1
    metrics = read_metrics(out)
    assert [line["accepted"] for line in metrics[1:]] == [3, 3]
    assert {"forward-loss:lenet", "forward-loss:shufflenetv2-0.5"} <= set(metrics[-1])
    architectures = {c["client"]: c["architecture"] for c in metrics[1]["resources"]["per-client"]}
    assert architectures == {0: "lenet", 1: "shufflenetv2-0.5", 2: "lenet"}
    for line in metrics[1:]:  # each ClientApp reports its own process's peak memory and training time
        for client in line["resources"]["per-client"]:
            assert client["measured"]["peak-rss-mb"] > 100 and client["measured"]["train-seconds"] > 0
    if federation.certs:  # with authentication on, a SuperNode whose key was never registered is refused:
        _write_node_key(tmp_path / "rogue")  # it exits, saying so (what the README's step 4 quotes)
        federation._start("rogue", federation.supernode_command("rogue", 0, 3))
        assert federation.processes["rogue"].wait(timeout=120) != 0, federation.logs()
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()


@pytest.mark.integration
def test_a_supernode_killed_mid_round_is_recorded_and_the_run_completes(federation: Federation, tmp_path: Path) -> None:
    federation.start(num_nodes=3)
    out = tmp_path / "run"
    experiment = _experiment(tmp_path, "")
    # the killed node fails by this timeout (or by its missed heartbeats); a live node's round must fit in it
    # on a loaded 2-core machine too, where starting a ClientApp and training took over 25 s
    experiment.write_text(experiment.read_text().replace("round-timeout = 180", "round-timeout = 90")
                          .replace("[client]", "[client]\nmin-replies = 2"))
    command = [str(BIN / "flwr"), "run", str(APP), "test", "--stream", "--run-config", f'config="{experiment}" out="{out}"']
    run = subprocess.Popen(command, env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):  # round 0 is written:
            if run.poll() is not None or time.monotonic() > deadline:  # round 1 starts once round 0 is written
                pytest.fail(f"the run ended before round 1:\n{run.stdout.read()}{federation.logs()}")
            time.sleep(0.2)
        federation.kill("node2")
        output, _ = run.communicate(timeout=600)  # two rounds of up to 90 s each, under load
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output + federation.logs()
    metrics = read_metrics(out)
    assert len(metrics) == 3 and "eval" in metrics[-1]
    # node 2 may still have answered round 1 before the kill reached it; from then on it fails every
    # round, and no other client ever does: assert on what the run recorded, not on the race
    failing_rounds = [line["round"] for line in metrics[1:] if line.get("failed")]
    assert failing_rounds and failing_rounds == list(range(failing_rounds[0], 3)), failing_rounds
    for line in metrics[1:]:
        failed = line.get("failed", [])
        assert "skipped" not in line and line["accepted"] + len(failed) == 3
        assert line["resources"]["replies"] == line["accepted"]
        for failure in failed:
            assert failure["client"] == 2
            assert "no reply within flower.round-timeout" in failure["reason"] or "ClientApp failed" in failure["reason"]
            dead = [c for c in line["resources"]["per-client"] if c["client"] == 2]
            assert dead and dead[0]["bytes-up"] == 0 and dead[0]["flops"] == 0  # sent its task, spent nothing we saw
    assert "failed 1" in output


DIGITS_FOUR_CLIENTS = """
name = "flower-malformed"
rounds = 3
threads = 1
[data]
dataset = "digits"
num-clients = 4
partition = "iid"
proxy-fraction = 0.3
[models]
large = "lenet"
small = ["lenet"]
[client]
lr = 0.05
min-replies = 2
[flower]
node-timeout = 60
round-timeout = 180
"""


def _app_with_client(directory: Path, module: Path) -> Path:
    """A copy of the Flower App whose ClientApp is `module`'s `app` (bundled into the app's FAB)."""
    directory.mkdir()
    shutil.copy(module, directory / module.name)
    pyproject = (APP / "pyproject.toml").read_text()
    (directory / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "koala.engine.flower.client_app:app"', f'clientapp = "{module.stem}:app"'))
    return directory


@pytest.mark.integration
def test_replies_that_cannot_be_decoded_fail_their_client_and_the_run_goes_on(federation: Federation, tmp_path: Path) -> None:
    # partition 1's ClientApp sends a string-typed array in round 1, bytes that are no .npy in round 2
    # and no arrays in round 3; partition 3's describes its partition as "three"
    # (tests/flower_apps/malformed_replies.py); the run waits for it flower.node-timeout = 60 s
    app = _app_with_client(tmp_path / "app", Path(__file__).parent / "flower_apps" / "malformed_replies.py")
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(DIGITS_FOUR_CLIENTS)
    federation.start(num_nodes=4)
    result = federation.run(experiment, tmp_path / "run", app=app)
    assert result.returncode == 0, result.stdout + result.stderr + federation.logs()
    metrics = read_metrics(tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "complete" and len(metrics) == 4, f"{status}\n{federation.logs()}"
    reasons = ["sent arrays that cannot be decoded as tensors", "sent arrays that cannot be decoded as tensors",
               "client 1 replied without arrays"]
    for line, reason in zip(metrics[1:], reasons):
        failed = {f["client"]: f["reason"] for f in line["failed"]}
        assert line["accepted"] == 2 and sorted(failed) == [1, 3] and reason in failed[1]
        assert "no SuperNode holds partition-id 3" in failed[3]
    # the server's state is that of the same run in which clients 1 and 3 never answered
    experiment_here = prepare_experiment(load_config(experiment))

    def clients_1_and_3_fail(task, data, config, spec, seed):
        if task.client_id in (1, 3):
            raise RuntimeError("unreachable")
        return local_train(task, data, config, spec, seed)

    dispatch = local_dispatch(experiment_here.algorithm, experiment_here.split, clients_1_and_3_fail)
    local = run_experiment(experiment_here, dispatch, tmp_path / "local", echo=lambda _: None)

    def comparable(lines: list[dict]) -> list[dict]:  # the models' metrics and losses (Flower sends node 3 nothing)
        return [{k: v for k, v in without_times(line).items() if k not in ("failed", "resources")} for line in lines]

    assert comparable(metrics) == comparable(local.metrics)


SIMULATION_NODE_TIMEOUT = "flower.node-timeout=600"
"""Ray's actors start slowly on a loaded machine (two cores shared with other work): the simulation
tests wait up to 10 minutes for their virtual SuperNodes, where a real failure still ends the run."""


@pytest.mark.integration
def test_flower_simulation_gives_the_local_engine_metrics(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                 "data.min-client-size=20", "client.lr=0.05", "rounds=2", "threads=1", SIMULATION_NODE_TIMEOUT]
    from koala.engine.flower.simulation import run_flower_simulation

    simulated = run_flower_simulation(load_config(None, overrides), tmp_path / "sim", echo=lambda _: None)
    local = run_local(load_config(None, overrides), tmp_path / "local", echo=lambda _: None)

    # Same seeds, same partitions, same order of aggregation, one thread each: bit-identical.
    assert without_times(simulated.metrics) == without_times(local.metrics)
    assert simulated.summary["engine"] == "flower-sim"


def test_flower_simulation_resumes_a_run_from_its_checkpoint(tmp_path: Path) -> None:
    # Simulated dropout is drawn by the shared run loop, so both engines leave out the same clients.
    config = load_config(None, ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'",
                                "models.small=['lenet']", "data.min-client-size=20", "client.lr=0.05", "rounds=3",
                                "threads=1", "client.dropout-probability=0.4", SIMULATION_NODE_TIMEOUT])
    from koala.engine.flower.simulation import run_flower_simulation

    reference = run_local(config, tmp_path / "reference", echo=lambda _: None)
    interrupt_run(config, tmp_path / "run", round_number=2)
    resumed = run_flower_simulation(config, tmp_path / "run", echo=lambda _: None, resume=True)
    assert without_times(resumed.metrics) == without_times(reference.metrics)
    assert any(line.get("failed") for line in reference.metrics)
    assert resumed.summary["engine"] == "flower-sim"


# -- the message codec and the node checks, without processes ------------------------------------


def _update(client_id: int = 3) -> ClientUpdate:
    import torch

    metrics = {"train-loss": 0.5, "trained-samples": 34}
    return ClientUpdate(client_id, "lenet", {"w": torch.ones(2, 2), "n": torch.tensor(4)}, 17, metrics)


def test_messages_round_trip_a_task_and_an_update() -> None:
    import torch

    task = ClientTask(3, "lenet", {"w": torch.arange(4.0).reshape(2, 2)})
    request = read_train(train_content(task, 5, "rounds = 7\n"))
    assert (request.task.client_id, request.task.architecture, request.round, request.experiment_toml) == (3, "lenet", 5, "rounds = 7\n")
    assert torch.equal(request.task.state["w"], task.state["w"])
    update = read_reply(reply_content(_update()), 3)
    assert update.num_examples == 17 and update.metrics == {"train-loss": 0.5, "trained-samples": 34.0}
    assert update.state["n"].dtype == torch.int64


def test_a_reply_from_another_client_or_without_weights_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="says it comes from client 3"):
        read_reply(reply_content(_update(3)), 4)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3, "client-id": 1}), "task": ConfigRecord({"architecture": "lenet"})})
    with pytest.raises(UpdateRejected, match="client 1 replied without arrays"):
        read_reply(content, 1)
    content = RecordDict({"arrays": ArrayRecord({}), "task": ConfigRecord({"architecture": "lenet"})})
    with pytest.raises(UpdateRejected, match="without metrics"):
        read_reply(content, 1)


def test_a_reply_with_bad_metrics_is_recorded_as_failed() -> None:
    content = RecordDict({
        "arrays": ArrayRecord({}),
        "metrics": MetricRecord({"num-examples": 3, "client-id": 1, "train-loss": 0.5, "trained-samples": -1}),
        "task": ConfigRecord({"architecture": "lenet"}),
    })
    replies = Replies()
    replies.received(ClientTask(1, "lenet", {}), read_reply(content, 1))
    assert replies.updates == []
    assert replies.failures == [{"client": 1, "reason": "client 1 reported trained-samples = -1; expected a whole number >= 0"}]


def test_a_node_without_a_matching_partition_gets_a_clear_error() -> None:
    with pytest.raises(ConfigError, match='--node-config "partition-id=K num-partitions=N"'):
        node_partition({})
    config = load_config(None, ["data.num-clients=4"])
    with pytest.raises(ConfigError, match="restart it with num-partitions=4"):
        _check_partition(config, 1, 1, 3)
    with pytest.raises(ConfigError, match="task for client 2 was sent to the SuperNode of partition 1"):
        _check_partition(config, 2, 1, 4)


@pytest.mark.parametrize("description, reason", [
    (RecordDict(), "no 'partition' record"),
    (RecordDict({"partition": ConfigRecord({"partition-id": "first", "num-partitions": 3})}), "must be integers"),
    (RecordDict({"partition": ConfigRecord({"num-partitions": 3})}), "must be integers (KeyError"),
], ids=["missing", "not-a-number", "no-id"])
def test_a_partition_description_that_cannot_be_read_names_what_is_wrong(description: RecordDict, reason: str) -> None:
    from koala.engine.flower.grid import Partition, read_partition

    with pytest.raises(ValueError) as raised:
        read_partition(description)
    assert reason in str(raised.value)
    assert read_partition(RecordDict({"partition": ConfigRecord({"partition-id": 2, "num-partitions": 3})})) == Partition(2, 3)
    named = RecordDict({"partition": ConfigRecord({"partition-id": 2, "num-partitions": 3, "device-class": "phone"})})
    assert read_partition(named) == Partition(2, 3, "phone")


def test_arrays_that_cannot_be_decoded_are_a_rejected_reply() -> None:
    import numpy as np
    from flwr.app import Array

    content = reply_content(_update(3))
    strings = RecordDict({**content, "arrays": ArrayRecord({"w": Array(np.array(["a", "b"]))})})
    with pytest.raises(UpdateRejected, match="client 3 sent arrays that cannot be decoded as tensors"):
        read_reply(strings, 3)
    garbage = RecordDict({**content, "arrays": ArrayRecord({"w": Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray",
                                                                        data=b"\x00not npy")})})
    with pytest.raises(UpdateRejected, match="cannot be decoded"):
        read_reply(garbage, 3)


def test_koala_certs_writes_a_ca_and_a_server_certificate_for_every_address(tmp_path: Path, capsys) -> None:
    assert main(["certs", "--address", "10.0.0.7", "--address", "superlink.example", "--out", str(tmp_path)]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example"]
    server.verify_directly_issued_by(ca)  # signed by the CA it came with
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert all((tmp_path / key).stat().st_mode & 0o077 == 0 for key in ("ca.key", "server.key"))  # owner-only
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["certs", "--address", "10.0.0.7", "--out", str(tmp_path)]) == 2  # never overwrites
    assert "already exist: choose another --out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_device_classes_named_by_supernodes_replace_the_seeded_ones() -> None:
    from koala.engine.flower.server_app import plan_for_announced_devices
    from koala.run.experiment import prepare_experiment

    devices = 'devices=[{name="sensor", count=3, memory-mb=0.3}, {name="hub", count=1, memory-mb=64}]'
    config = load_config(None, ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "data.min-client-size=20",
                                "client.batch-size=32", "models.small=['lenet-narrow','lenet-wide']", devices])
    algorithm = prepare_experiment(config).algorithm
    seeded = list(algorithm.assignment)
    assert sorted(seeded) == ["lenet-narrow"] * 3 + ["lenet-wide"]
    narrow = [client for client, arch in enumerate(seeded) if arch == "lenet-narrow"]
    printed: list[str] = []
    plan_for_announced_devices(algorithm, {narrow[0]: "hub"}, printed.append)  # that node says it is a hub
    assert algorithm.assignment[narrow[0]] == "lenet-wide" and algorithm.assignment.count("lenet-wide") == 2
    assert {p.device_class: len(p.clients) for p in algorithm.device_plan} == {"sensor": 2, "hub": 2}
    assert "replace the seeded ones" in printed[0]
    with pytest.raises(ConfigError, match=r"SuperNodes name device classes \['phone'\] that the experiment does not list"):
        plan_for_announced_devices(algorithm, {0: "phone"}, printed.append)
