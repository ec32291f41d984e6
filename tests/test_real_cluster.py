"""A real two-node Ray cluster on this machine, driven by Ray's own command-line clients.

``ray start --head`` and a second ``ray start --address`` (1 CPU each, each with its own
temp dir and ports), with token authentication (``RAY_AUTH_MODE=token`` and one shared
``RAY_AUTH_TOKEN`` in every node's and every client's environment, as Ray's docs say for
clusters not started by ``ray.init``). On it: ``experiments/domainbed_aux_pool.py`` run
as ``ray submit`` runs it (a driver on the head with ``--address``), then
``experiments/domainbed_sweep.py`` borrowing that pool, submitted with ``ray job submit``:
the script must attach to this cluster through the ``RAY_ADDRESS`` the job gets, not
start its own Ray. One CPU per node and one CPU per trial mean that two concurrent trials
can only run on two different nodes. The data is the tiny DomainBed tree of conftest.py.

Network: a multi-node Ray cluster advertises each node under the host's own routable
address, never loopback (``ray._private.services.resolve_ip_for_localhost``); traffic to a
local address never leaves the host. This test process itself only runs the CLIs and talks
to nothing (the clients reach the GCS and the dashboard on 127.0.0.1).

Teardown never runs ``ray stop``: it kills every Ray process on the machine, other
users' included. Each node runs ``ray start --block``, so every Ray process of this
cluster descends from one of those two; they are all killed by pid, even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import shared_sweep_cache

from raysoup.results import load_results

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "experiments" / "domainbed_aux_pool.py"
SWEEP = REPO / "experiments" / "domainbed_sweep.py"
RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started"
OBJECT_STORE_BYTES = str(100 * 1024 * 1024)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open while choosing)."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class TwoNodeCluster:
    gcs: str  # bootstrap address, 127.0.0.1:<port>
    dashboard: str  # http://127.0.0.1:<port>, where the job client talks
    env: dict[str, str]  # what every Ray process and client of this cluster gets
    nodes: list[subprocess.Popen]
    logs: list[Path]

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def alive_nodes(self) -> list[dict]:
        done = self.ray("list", "nodes", "--address", self.gcs, "--format", "json", timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return [n for n in json.loads(done.stdout) if n["state"] == "ALIVE"]

    def log_tails(self) -> str:
        return "\n".join(f"--- {log}\n{log.read_text()[-1500:]}" for log in self.logs)


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --block ...`` in the background; returns once the node is up."""
    with open(log, "w") as out:
        node = subprocess.Popen(
            [RAY, "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest does not reach it; teardown does
        )
    deadline = time.time() + 120
    while STARTED not in log.read_text():
        if node.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray start failed (exit {node.poll()}):\n{log.read_text()}")
        time.sleep(0.5)
    return node


def _descendants(pids: list[int]) -> list[int]:
    """Every live descendant of ``pids`` (from ``ps``: Ray's clusters are Linux/macOS)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_trees(nodes: list[subprocess.Popen]) -> None:
    """SIGKILL each ``ray start --block`` and all its descendants, by pid."""
    pids = [node.pid for node in nodes]
    victims = pids + _descendants(pids)  # before killing: orphans lose their parent link
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for node in nodes:
        node.wait(timeout=30)
    deadline = time.time() + 30
    while (alive := [pid for pid in victims if _alive(pid)]) and time.time() < deadline:
        time.sleep(0.2)  # orphans are reaped by init
    assert not alive, f"Ray processes survived teardown: {alive}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    logs = tmp_path_factory.mktemp("ray-logs")
    # Short temp dirs: Ray puts Unix sockets under them (108-byte path limit).
    temp_dirs = [Path(tempfile.mkdtemp(prefix=f"rs-{role}-")) for role in ("head", "node")]
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # what `ray get-auth-token --generate` makes
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAYSOUP_OFFLINE": "1",  # never try to download ImageNet weights
        "RAYSOUP_CACHE": str(shared_sweep_cache(tmp_path_factory)),
    }
    (gcs, dashboard, client, *ports) = free_ports(15)
    per_node = [
        [
            "--node-manager-port", str(ports.pop()),
            "--object-manager-port", str(ports.pop()),
            "--dashboard-agent-listen-port", str(ports.pop()),
            "--dashboard-agent-grpc-port", str(ports.pop()),
            "--runtime-env-agent-port", str(ports.pop()),
            "--metrics-export-port", str(ports.pop()),
            "--num-cpus", "1",
            "--num-gpus", "0",
            "--object-store-memory", OBJECT_STORE_BYTES,
            "--temp-dir", str(temp_dir),
            "--disable-usage-stats",
        ]
        for temp_dir in temp_dirs
    ]  # fmt: skip
    head_args = [
        "--head",
        "--port", str(gcs),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client),
    ]  # fmt: skip
    nodes: list[subprocess.Popen] = []
    node_logs = [logs / "head.log", logs / "node.log"]
    try:
        nodes.append(_start_node(head_args + per_node[0], env, node_logs[0]))
        worker_args = ["--address", f"127.0.0.1:{gcs}", *per_node[1]]
        nodes.append(_start_node(worker_args, env, node_logs[1]))
        found = TwoNodeCluster(
            f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, nodes, node_logs
        )
        deadline = time.time() + 60
        while len(found.alive_nodes()) < 2:
            assert time.time() < deadline, f"the second node never joined\n{found.log_tails()}"
            time.sleep(1)
        yield found
    finally:
        try:
            _kill_trees(nodes)
        finally:
            for temp_dir in temp_dirs:
                shutil.rmtree(temp_dir, ignore_errors=True)


def test_token_auth_is_enforced(cluster: TwoNodeCluster) -> None:
    """The cluster really is token-protected: a client with the wrong token is refused."""
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    done = subprocess.run(
        [RAY, "job", "list", "--address", cluster.dashboard],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "AuthenticationError" in done.stderr, done.stderr[-2000:]


def _common_args(tmp_path: Path, tiny_domainbed: tuple[Path, Path]) -> list[str]:
    data_dir, weights = tiny_domainbed
    return [
        "--data-dir", str(data_dir),
        "--arch", "resnet18",
        "--pretrained-weights", str(weights),
        "--hparams", json.dumps({"batch_size": 2}),
        "--checkpoint-freq", "2",
        "--cpus-per-trial", "1",
        "--storage", str(tmp_path / "shared"),  # one machine: every node sees this path
    ]  # fmt: skip


def test_pool_then_job_submitted_sweep_on_both_nodes(
    cluster: TwoNodeCluster, tmp_path: Path, tiny_domainbed: tuple[Path, Path]
) -> None:
    common = _common_args(tmp_path, tiny_domainbed)
    storage = tmp_path / "shared"
    # 1. The auxiliary pool, its driver run on the head as `ray submit ... -- --address`
    #    would (an explicit address: `auto` would also see other Ray instances here).
    pool_args = ["--datasets", "VLCS", "--steps", "2", "--lp-steps", "2", "--n-hparams", "1"]
    pool_args += ["--name", "pool"]
    pool_run = subprocess.run(
        [sys.executable, str(POOL), *pool_args, *common, "--address", cluster.gcs],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pool_run.returncode == 0, f"{pool_run.stderr[-4000:]}\n{cluster.log_tails()}"
    assert "Started a local Ray instance" not in pool_run.stderr
    pool = load_results(storage / "pool")["trials"].sort_values("trial_id")
    assert pool.trial_id.tolist() == ["aux-VLCS-h0", "lp-VLCS-all"]  # the aux LP, then its run
    assert pool.test_env.tolist() == [-1, -1]

    # 2. The target sweep, borrowing the pool, submitted with the real job client.
    job_id = f"raysoup-{uuid.uuid4().hex[:8]}"
    sweep_args = [
        "--dataset", "PACS",
        "--test-env", "S",  # by name: env 3
        "--init", "pretrained", "fusing",
        "--n-hparams", "1",
        "--trial-seeds", "0",
        "--aux-datasets", "VLCS",
        "--aux-n-hparams", "1",
        "--aux-pool", str(storage / "pool"),
        "--steps", "2",
        "--lp-steps", "2",
        "--name", "pacs",
    ]  # fmt: skip
    # no --address: the job's RAY_ADDRESS must attach the script to this cluster
    entrypoint = [sys.executable, str(SWEEP), *sweep_args, *common]
    done = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
        "--", *entrypoint, timeout=480,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{output[-4000:]}\n{cluster.log_tails()}"
    assert f"Job '{job_id}' succeeded" in output
    assert "Started a local Ray instance" not in output  # attached, not a Ray of its own
    assert "stage aux" not in output  # the pool lent its run: no aux stage here

    trials = load_results(storage / "pacs")["trials"].set_index("trial_id").sort_index()
    assert trials.index.tolist() == [
        "lp-PACS-e3-s0",
        "target-PACS-e3-s0-h0-fusing",
        "target-PACS-e3-s0-h0-pretrained",
    ]  # every planned trial, each exactly once
    assert (trials.dataset == "PACS").all() and (trials.test_env == 3).all()
    assert (trials.batch_size == 2).all() and trials.id_val_acc.between(0, 1).all()
    fusing = trials.loc["target-PACS-e3-s0-h0-fusing"]
    pool_run_dir = storage / "pool" / "checkpoints" / "aux" / "aux-VLCS-h0"
    assert list(fusing.init_sources) == ["pretrained", str(pool_run_dir)]
    assert sum(fusing.init_weights) == pytest.approx(1.0)
    assert "fusing" in output and "pretrained" in output  # the printed table

    nodes = {n["node_id"]: n for n in cluster.alive_nodes()}
    assert len(nodes) == 2
    everything = pd.concat([pool, trials.reset_index()])
    assert set(everything.node_id) <= set(nodes)
    assert set(everything.node_ip) == {n["node_ip"] for n in nodes.values()}
    # Where the trials ran is Tune's choice: with reused workers a short trial takes a
    # worker freed on one node rather than wait for a new process on the other, so the
    # two target trials may run in turn on one node. Each ran in a worker of the cluster.
    target = trials[trials.stage == "target"]
    assert set(target.node_id) <= set(nodes), target.node_id
