"""`predict --engine ray`: the same output as the local engine, on a Ray instance of its own, on a
cluster of a head and a worker node started as separate processes on loopback, and with one actor
killed mid-run."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from exporter.delivery.serve import free_port
from test_predict import rows_for, shards, write_jsonl

pytest.importorskip("ray")
# One test process runs this module (pytest-xdist): one Ray instance at a time
pytestmark = pytest.mark.xdist_group("test_predict_ray")

RAY = str(Path(sys.executable).with_name("ray"))


def predict(artifact: Path, data: Path, out: Path, *extra: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "predict", str(artifact), "--input", str(data),
                           "--output", str(out), "--shard-rows", "8", "--batch", "4", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=True, env=env)


def processes() -> dict[int, tuple[int, int, bytes]]:
    """Every process: pid -> (parent, session, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[1]), int(fields[3]), (entry / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return found


def actor_pids(root: int) -> list[int]:
    """predict's Ray actors below process `root` (Ray titles them after the actor's class)."""
    table, below, todo = processes(), set(), [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent]
        below.update(children)
        todo.extend(children)
    return [pid for pid in below if b"MapBatches(RayWorker)" in table[pid][2]]


def end_sessions(sessions: set[int]) -> None:
    """End every process of these sessions: the Ray nodes a test started (`ray stop` would end every Ray
    process of the machine, another test's too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [pid for pid, (_, session, _) in processes().items() if session in sessions]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(s in sessions for _, s, _ in processes().values()):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def corpus(built, tmp_path_factory):
    """The qa rows, and the local engine's output for them: what every Ray run must write too."""
    folder = tmp_path_factory.mktemp("ray-corpus")
    rows = [{**row, "n": i} for i, row in enumerate(rows_for("qa") * 4)]
    data = write_jsonl(folder / "in.jsonl", rows)
    predict(built["qa"][0], data, folder / "local")
    return data, shards(folder / "local"), len(rows)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head and a worker node started as separate processes on loopback, as a cluster is run: every
    process (nodes and the driver) holds the cluster's token (Ray's token authentication), here one of the
    test's own. Yields its address and the environment a driver needs; stops everything it started."""
    token = tmp_path_factory.mktemp("ray-cluster") / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, common = free_port(), ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    sessions = set()  # each node's processes, in a session of their own
    try:
        for role in (["--head", "--port", str(port), "--include-dashboard", "false"], ["--address", f"127.0.0.1:{port}"]):
            start = subprocess.Popen([RAY, "start", *role, *common], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
            sessions.add(start.pid)
            _, err = start.communicate(timeout=120)
            assert start.returncode == 0, err[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        end_sessions(sessions)
        current = Path("/tmp/ray/ray_current_cluster")  # where `ray start` says which cluster is the machine's
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    assert not any(session in sessions for _, session, _ in processes().values())


@pytest.mark.parametrize("head", ["qa", "sequence-classification", "token-classification", "base", "causal-lm"])
def test_each_head_on_a_cluster_of_a_head_and_a_worker_node_writes_what_the_local_engine_does(built, cluster, head,
                                                                                             tmp_path):
    """The local engine's output equals Session's answers (test_predict.py); Ray's must be the same bytes."""
    address, env = cluster
    rows = rows_for(head)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    extra = ["--helper-args", '{"max_new_tokens": 4}'] if head == "causal-lm" else []
    predict(built[head][0], data, tmp_path / "local", *extra)
    done = predict(built[head][0], data, tmp_path / "ray", "--engine", "ray", "--workers", "2", "--ray-address",
                   address, *extra, env=env)
    assert f"predicted {len(rows)} rows" in done.stdout, done.stdout + done.stderr
    assert shards(tmp_path / "ray").equals(shards(tmp_path / "local"))


def test_a_ray_instance_of_its_own_writes_what_the_local_engine_does(built, corpus, tmp_path):
    data, expected, count = corpus
    done = predict(built["qa"][0], data, tmp_path / "out", "--engine", "ray", "--workers", "2")
    assert f"predicted {count} rows" in done.stdout, done.stdout + done.stderr
    assert shards(tmp_path / "out").equals(expected)


def test_an_actor_killed_mid_run_is_replaced_and_every_row_answered_once(built, corpus, tmp_path):
    data, expected, count = corpus
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "exporter", "predict", str(built["qa"][0]), "--input",
                                str(data), "--output", str(out), "--shard-rows", "8", "--batch", "4", "--engine",
                                "ray", "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline, killed = time.monotonic() + 120, None
    while killed is None and time.monotonic() < deadline and process.poll() is None:
        pids = actor_pids(process.pid)
        if pids and list(out.glob("part-*.parquet")):
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.01)
    stdout, stderr = process.communicate(timeout=300)
    assert killed is not None and len(list(out.glob("part-*.parquet"))) == count // 8
    assert process.returncode == 0 and f"predicted {count} rows" in stdout, stdout + stderr[-2000:]
    answered = shards(out)
    assert answered.equals(expected)
    assert sorted(answered.column("n").to_pylist()) == list(range(count))  # each row once


def test_without_ray_the_engine_says_what_to_install(built, corpus, tmp_path):
    data, _, _ = corpus
    script = ("import importlib.util, sys\nreal = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'ray' else real(name, *a)\n"
              "from exporter.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "predict", str(built["qa"][0]), "--input", str(data),
                           "--output", str(tmp_path / "out"), "--engine", "ray"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "pip install 'megatron-deploy[ray]'" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_an_address_where_no_cluster_answers_is_one_line_and_exit_2(built, corpus, tmp_path):
    data, _, _ = corpus
    done = subprocess.run([sys.executable, "-m", "exporter", "predict", str(built["qa"][0]), "--input", str(data),
                           "--output", str(tmp_path / "out"), "--engine", "ray", "--ray-address",
                           f"127.0.0.1:{free_port()}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "no Ray cluster answers there" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
