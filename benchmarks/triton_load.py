"""Load on a real Triton server: `python -m exporter serve` against an in-process runtime.Session loop.

    .serve/bin/python benchmarks/triton_load.py artifacts/bench-345m/qa-fp32.json artifacts/bench-345m/qa-int8.json

Run it with the serving environment's Python (numpy<2 and `.[serve]`, see the README). For every
artifact (a single-graph head, batch 1 at --seq tokens of random ids) and every concurrency, C clients
send R requests in all: first to a Session in this process (one thread per client, as a plain
threaded server would), then over gRPC to the served model with Triton's dynamic batching on and off.
Prints p50/p99 latency and requests/s, and counts errors and answers that differ from the Session's
(relative 1e-3: a batch may sum in another order; int8's dynamic scales see the whole batch).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import Session  # noqa: E402
from exporter.delivery.serve import free_port  # noqa: E402
from exporter.delivery.triton import infer_inputs  # noqa: E402
from runtime.machine import describe  # noqa: E402


MODES = ("in-process", "batching", "no-batching")


def drive(clients: int, total: int, call: Callable[[], np.ndarray], expected: np.ndarray) -> dict:
    """`clients` threads share `total` calls; latencies, throughput, errors and wrong answers."""
    latencies: list[float] = []
    counts = {"errors": 0, "mismatches": 0}
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            try:
                got = call()
            except Exception:  # noqa: BLE001 - counted and reported, whatever the client raised
                with lock:
                    counts["errors"] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                counts["mismatches"] += not np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    per_client = math.ceil(total / clients)
    threads = [threading.Thread(target=client, args=(per_client,)) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests": clients * per_client, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "per_s": len(ms) / wall, **counts}


class Served:
    """`python -m exporter serve ARTIFACT` with this Python, until stop()."""

    def __init__(self, artifact: Path, batching: bool, log: Path):
        self.port, self.grpc_port = free_port(), free_port()
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "exporter", "serve", str(artifact), "--port", str(self.port), "--grpc-port",
                 str(self.grpc_port), *([] if batching else ["--no-dynamic-batching"])],
                stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
        while "serving on" not in log.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise SystemExit(f"serve failed:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)


def grpc_call(url: str, model: str, feed: dict[str, np.ndarray], output: str) -> Callable[[], np.ndarray]:
    import tritonclient.grpc as grpcclient

    local = threading.local()  # one connection per client thread

    def call() -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
        return local.client.infer(model, infer_inputs(grpcclient, feed)).as_numpy(output)

    return call


def random_feed(session: Session, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    names = [t["name"] for t in session.manifest.graphs["model"]["inputs"]]
    feed = {"input_ids": rng.integers(1000, session.manifest.config["vocab_size"], (1, seq), dtype=np.int64),
            "attention_mask": np.ones((1, seq), np.int64), "token_type_ids": np.zeros((1, seq), np.int64)}
    return {name: feed[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level, at least 2 per client")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all three")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    host = describe()
    print(f"# {host['cpu']}, {host['cores']} cores, flags {', '.join(host['cpu_flags']) or 'none'}; "
          f"batch 1 x {args.seq} tokens per request")
    print("| artifact | served by | clients | requests | p50 ms | p99 ms | requests/s | errors | mismatches |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for artifact in args.artifacts:
            session = Session(artifact)
            feed = random_feed(session, args.seq)
            output = session.manifest.graphs["model"]["outputs"][0]["name"]
            expected = session.run(feed)[output]
            runs = {"in-process": ("in-process Session", lambda: session.run(feed)[output], None),
                    "batching": ("Triton, dynamic batching on", None, True),
                    "no-batching": ("Triton, dynamic batching off", None, False)}
            for label, call, batching in (runs[mode] for mode in args.modes):
                served = None
                if batching is not None:
                    served = Served(artifact, batching, Path(work) / f"{session.manifest.name}-{batching}.log")
                    call = grpc_call(f"127.0.0.1:{served.grpc_port}", session.manifest.name, feed, output)
                call()  # warm-up
                for clients in args.concurrency:
                    row = {"artifact": session.manifest.name, "served_by": label, "clients": clients,
                           **drive(clients, max(args.requests, 2 * clients), call, expected)}
                    rows.append(row)
                    print(f"| {row['artifact']} | {label} | {clients} | {row['requests']} | {row['p50_ms']:.0f} | "
                          f"{row['p99_ms']:.0f} | {row['per_s']:.2f} | {row['errors']} | {row['mismatches']} |",
                          flush=True)
                if served:
                    served.stop()
            del session
    if args.json:
        args.json.write_text(json.dumps({"machine": host, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
