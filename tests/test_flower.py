"""The Flower engines with real processes on loopback: a SuperLink and SuperNodes (plain and TLS), a
SuperNode killed mid-round, and the simulation engine against the local engine."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
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
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from interruption import interrupt_run  # noqa: E402

from koala.config import load_config  # noqa: E402
from koala.engine.dispatch import Replies  # noqa: E402
from koala.engine.flower.client_app import _check_partition, node_partition  # noqa: E402
from koala.engine.flower.messages import (  # noqa: E402
    read_reply,
    read_train,
    reply_content,
    train_content,
)
from koala.errors import ConfigError, UpdateRejected  # noqa: E402
from koala.run.launch import run_local  # noqa: E402
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
    """A CA and a server certificate for 127.0.0.1, signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "koala-fl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


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

    def run(self, config: Path, out: Path, timeout: float = 420) -> subprocess.CompletedProcess:
        command = [str(BIN / "flwr"), "run", str(APP), "test", "--stream",
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
    if federation.certs:  # with authentication on, a SuperNode whose key was never registered is refused
        _write_node_key(tmp_path / "rogue")
        federation._start("rogue", federation.supernode_command("rogue", 0, 3))
        deadline = time.monotonic() + 120
        while "Attempted to register SuperNode with public key" not in (tmp_path / "superlink.log").read_text():
            assert time.monotonic() < deadline, federation.logs()
            time.sleep(0.5)


@pytest.mark.integration
def test_a_supernode_killed_mid_round_is_recorded_and_the_run_completes(federation: Federation, tmp_path: Path) -> None:
    federation.start(num_nodes=3)
    out = tmp_path / "run"
    experiment = _experiment(tmp_path, "")
    experiment.write_text(experiment.read_text().replace("round-timeout = 180", "round-timeout = 25")
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
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output + federation.logs()
    metrics = read_metrics(out)
    assert len(metrics) == 3 and "eval" in metrics[-1]
    for line in metrics[1:]:
        assert line["accepted"] == 2 and "skipped" not in line
        [failure] = line["failed"]
        assert failure["client"] == 2
        assert "no reply within flower.round-timeout" in failure["reason"] or "ClientApp failed" in failure["reason"]
        dead = [c for c in line["resources"]["per-client"] if c["client"] == 2]
        assert dead and dead[0]["bytes-up"] == 0 and dead[0]["flops"] == 0  # sent its task, spent nothing we saw
        assert line["resources"]["replies"] == 2
    assert "failed 1" in output


@pytest.mark.integration
def test_flower_simulation_gives_the_local_engine_metrics(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                 "data.min-client-size=20", "client.lr=0.05", "rounds=2", "threads=1"]
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
                                "threads=1", "client.dropout-probability=0.4"])
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
