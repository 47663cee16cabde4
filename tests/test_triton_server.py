"""A real Triton Inference Server (nvidia-pytriton's tritonserver, Python backend) started by
`python -m exporter serve` on loopback: its answers over HTTP and gRPC equal runtime.Session's in
process; a broken artifact or a bad request fails alone; a killed server gives errors, never wrong
answers, and a restarted one serves again.

The server runs in the `serving_python` environment (conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_result, tiny_limits
from exporter.cli import main
from exporter.delivery.serve import free_port
from exporter.delivery.triton import infer_inputs
from runtime import Session

# One test process runs this module (pytest-xdist), so that its server starts once.
pytestmark = pytest.mark.xdist_group("test_triton_server")

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

START_TIMEOUT_S = 240
# `python -m exporter serve ...` as a serving install has it: none of the exporter's own libraries
SERVE_AS_INSTALLED = ("import sys\nfor m in ('torch', 'onnx', 'onnxscript', 'onnx_ir', 'safetensors', 'polygraphy'):\n"
                      "    sys.modules[m] = None\nfrom exporter.cli import main\nsys.exit(main(['serve', *sys.argv[1:]]))")
SHORT = "Engineers from the town built it."  # fits the raw models' 48 tokens
CONTEXT = "The bridge over the river was built by engineers from the town in the year 1850. " * 4  # windows


class Server:
    """`python -m exporter serve` in the serving environment, its output in a log file."""

    def __init__(self, python: Path, artifacts: list[Path], log: Path, *options: str, ports=None):
        self.http_port, self.grpc_port = ports or (free_port(), free_port())
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(python), "-c", SERVE_AS_INSTALLED, *map(str, artifacts), "--port", str(self.http_port),
                 "--grpc-port", str(self.grpc_port), *options], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving on" not in self.text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.2)
        self.http = f"127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def triton_pid(self) -> int:
        """The tritonserver process that `serve` started."""
        started = children(self.process.pid)
        assert len(started) == 1, started
        return started[0]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def tampered_copy(manifest: Path, into: Path) -> Path:
    """A copy of an artifact with one byte of its graph changed after the build."""
    into.mkdir()
    for file in manifest.parent.iterdir():
        if file.name.startswith(manifest.stem + "."):
            shutil.copy(file, into / file.name)
    graph = into / f"{manifest.stem}.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    return into / manifest.name


@pytest.fixture(scope="module")
def int4(hf_checkpoints, tmp_path_factory):
    """The qa and causal-LM heads as int4 artifacts (MatMulNBits graphs), named HEAD-int4."""
    from exporter.pipeline.build import BuildOptions, build

    out = tmp_path_factory.mktemp("int4")
    return {head: build(BuildOptions(head=head, checkpoint=str(hf_checkpoints[head][0]), out=out, precision="int4",
                                     name=f"{head}-int4", eval_data="none", **tiny_limits(head)), log=lambda _: None)
            for head in ("qa", "causal-lm")}


@pytest.fixture(scope="module")
def server(serving_python, built, int4, tmp_path_factory):
    work = tmp_path_factory.mktemp("served")
    artifacts = [built["qa"][0], built["causal-lm"][0], built["sequence-classification"][0], *int4.values(),
                 tampered_copy(built["nsp"][0], work / "tampered")]
    served = Server(serving_python, artifacts, work / "serve.log")
    yield served
    assert served.stop() == 0, served.text()[-3000:]
    assert "stopping: in-flight requests finish first" in served.text()


def infer(module, url: str, model: str, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    client = module.InferenceServerClient(url)
    result = client.infer(model, infer_inputs(module, feed), outputs=[module.InferRequestedOutput(n) for n in outputs])
    return {name: result.as_numpy(name) for name in outputs}


def ask(module, url: str, model: str, arguments: dict):
    """A text model's answer: JSON in, JSON out."""
    request = np.array([json.dumps(arguments).encode()], dtype=np.object_)
    return json.loads(infer(module, url, model, {"REQUEST": request}, ["RESULT"])["RESULT"][0])


def encoded(session: Session, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
    return session.batch(session.encode(texts, pairs))


def outputs_of(session: Session, graph: str) -> list[str]:
    return [t["name"] for t in session.manifest.graphs[graph]["outputs"]]


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_raw_models_answer_as_the_session_does(server, built, int4, module, precision):
    url = server.http if module is httpclient else server.grpc
    artifacts = {head: path for head, (path, _) in built.items()} if precision == "fp32" else int4
    for head in ("qa", "sequence-classification") if precision == "fp32" else ("qa",):
        session = Session(artifacts[head])
        feed = encoded(session, ["Who built the bridge?", "When?"], [SHORT, "In 1850."])
        served = infer(module, url, session.manifest.name, feed, outputs_of(session, "model"))
        for name, expected in session.run(feed).items():
            np.testing.assert_allclose(served[name], expected, rtol=1e-5, atol=1e-6, err_msg=f"{head} {name}")
    session = Session(artifacts["causal-lm"])
    lm = session.manifest.name
    prompt = {k: v for k, v in encoded(session, ["the river flows"]).items() if k != "token_type_ids"}
    prompt["position_ids"] = np.arange(prompt["input_ids"].shape[1], dtype=np.int64)[None]
    expected = session.run(prompt, "prefill")
    served = infer(module, url, f"{lm}-prefill", prompt, outputs_of(session, "prefill"))
    for name in expected:
        np.testing.assert_allclose(served[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    step = {"input_ids": expected["logits"].argmax(-1).reshape(1, 1).astype(np.int64),
            "attention_mask": np.ones((1, prompt["input_ids"].shape[1] + 1), np.int64),
            "position_ids": np.array([[prompt["input_ids"].shape[1]]], np.int64),
            **{name.replace("present", "past_key_values"): value for name, value in expected.items() if name != "logits"}}
    served = infer(module, url, f"{lm}-decode", step, outputs_of(session, "decode"))
    for name, value in session.run(step, "decode").items():
        np.testing.assert_allclose(served[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_text_models_answer_as_the_session_does(server, built, int4, module):
    url = server.http if module is httpclient else server.grpc
    cases = {"qa": ("answer", {"question": "Who built the bridge?", "context": CONTEXT, "top_k": 2}),
             "sequence-classification": ("classify", {"text": ["a calm river", "the town"], "top_k": 2}),
             "causal-lm": ("generate", {"prompt": "the river", "max_new_tokens": 6})}
    artifacts = [*((built[head][0], case) for head, case in cases.items()),
                 *((path, cases[head]) for head, path in int4.items())]
    for path, (helper, arguments) in artifacts:
        session = Session(path)
        expected = getattr(session, helper)(**arguments)
        assert_same_result(ask(module, url, f"{session.manifest.name}-text", arguments), json.loads(json.dumps(expected)))


def test_health_readiness_and_a_tampered_artifact_left_unavailable(server):
    log = server.text()
    for model in ("qa", "qa-text", "causal-lm-prefill", "causal-lm-decode", "sequence-classification-text"):
        assert f"  {model}: READY" in log
        assert server.status(f"/v2/models/{model}/ready") == 200
    # the runtime's own message, in serve's summary and in Triton's log
    assert "  nsp: UNAVAILABLE" in log and "  nsp-text: UNAVAILABLE" in log
    assert log.count("contents differ from the manifest (sha256 mismatch)") >= 4
    assert server.status("/v2/models/nsp/ready") == 400 and server.status("/v2/models/nsp-text/ready") == 400
    assert server.status("/v2/health/live") == 200
    assert server.status("/v2/health/ready") == 400  # strict readiness: a replica missing a model takes no traffic
    assert "CudaDriverHelper" not in log and "CUDA driver version is insufficient" not in log  # a CPU host's noise


def test_bad_requests_get_the_runtimes_message_and_the_server_keeps_serving(server, built):
    session = Session(built["qa"][0])
    good = encoded(session, ["Who built the bridge?"], ["Engineers did."])
    outputs = outputs_of(session, "model")
    vocabulary = session.manifest.config["vocab_size"]
    longest = session.manifest.shape_limits["sequence"][2]
    wrong = {
        "wrong dtype": ({**good, "input_ids": good["input_ids"].astype(np.int32)}, "INT32"),
        "too long": ({k: np.ones((1, longest + 1), np.int64) for k in good}, f"{longest + 1}"),
        "ids out of range": ({**good, "input_ids": np.full_like(good["input_ids"], vocabulary)},
                             f"input_ids must lie in [0, {vocabulary})"),
        "mask not 0/1": ({**good, "attention_mask": np.full_like(good["attention_mask"], 2)}, "attention_mask"),
    }
    for module, url in ((httpclient, server.http), (grpcclient, server.grpc)):
        for case, (feed, message) in wrong.items():
            with pytest.raises(InferenceServerException, match=re.escape(message)):
                infer(module, url, "qa", feed, outputs)
        for arguments, message in (({"question": "?", "context": "x", "top_k": 0}, "top_k"),
                                   ({"helper": "generate", "prompt": "x"}, "not a helper"),
                                   ({"question": "?"}, "context")):
            with pytest.raises(InferenceServerException, match=message):
                ask(module, url, "qa-text", arguments)
        with pytest.raises(InferenceServerException, match="JSON object"):
            infer(module, url, "qa-text", {"REQUEST": np.array([b"[1, 2]"], dtype=np.object_)}, ["RESULT"])
        # a refusal is the client's error, in one line, with nothing of the server's insides
        refused = "400" if module is httpclient else "StatusCode.INVALID_ARGUMENT"
        for request in (json.dumps({"question": "?", "context": "x", "top_k": 0}), "[" * 100_000 + "]" * 100_000,
                        json.dumps({"question": "?", "context": "x", "bogus": 1})):
            with pytest.raises(InferenceServerException) as err:
                infer(module, url, "qa-text", {"REQUEST": np.array([request.encode()], dtype=np.object_)}, ["RESULT"])
            assert err.value.status() == refused, (request[:40], err.value.status())
            assert "Traceback" not in str(err.value) and "/runtime/" not in str(err.value), str(err.value)
        with pytest.raises(InferenceServerException) as err:
            infer(module, url, "qa", wrong["too long"][0], outputs)
        assert err.value.status() == refused
        np.testing.assert_allclose(infer(module, url, "qa", good, outputs)["start_logits"],
                                   session.run(good)["start_logits"], rtol=1e-5, atol=1e-6)


def test_a_request_declaring_more_than_it_carries_is_refused_and_the_server_keeps_serving(server, built):
    """Triton's HTTP endpoint would allocate `[1, 2**40]` int64s before reading 8 (std::bad_alloc kills it);
    its gRPC endpoint compares sizes first. Both refuse, and the same server answers the next request."""
    session = Session(built["qa"][0])
    good = encoded(session, ["Who built the bridge?"], ["Engineers did."])
    declared = {"input_ids": [1, 1099511627776], "attention_mask": [1, 8], "token_type_ids": [1, 8]}
    body = {"inputs": [{"name": n, "shape": shape, "datatype": "INT64", "data": [1] * 8} for n, shape in declared.items()]}
    request = urllib.request.Request(f"http://{server.http}/v2/models/qa/infer", data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "declares more than" in refused.value.read().decode()

    from tritonclient.grpc import service_pb2, service_pb2_grpc

    import grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
    raw = service_pb2.ModelInferRequest(model_name="qa")
    for name, shape in declared.items():
        raw.inputs.add(name=name, datatype="INT64", shape=shape)
        raw.raw_input_contents.append(np.ones(8, np.int64).tobytes())
    with pytest.raises(grpc.RpcError) as refused_grpc:
        stub.ModelInfer(raw, timeout=30)
    assert refused_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    for module, url in ((httpclient, server.http), (grpcclient, server.grpc)):
        np.testing.assert_allclose(infer(module, url, "qa", good, outputs_of(session, "model"))["start_logits"],
                                   session.run(good)["start_logits"], rtol=1e-5, atol=1e-6)
    assert server.process.poll() is None and "stopped by itself" not in server.text()


def test_many_clients_batched_together_all_get_their_own_answer(server, built):
    """16 concurrent clients x 200 requests of two lengths: no error, no mismatch, and Triton's dynamic
    batcher did put requests together."""
    session = Session(built["qa"][0])
    questions = [("Who built the bridge?", SHORT), ("When was it built?", "In the year 1850."),
                 ("Where?", "Over the river."), ("By whom?", SHORT[:40])]
    feeds = [encoded(session, [q], [c]) for q, c in questions]
    expected = [session.run(feed)["start_logits"] for feed in feeds]
    problems: list[str] = []

    def client(index: int) -> None:
        connection = httpclient.InferenceServerClient(server.http)
        for n in range(200):
            which = (index + n) % len(feeds)
            try:
                got = connection.infer("qa", infer_inputs(httpclient, feeds[which])).as_numpy("start_logits")
            except InferenceServerException as err:
                problems.append(f"error: {err}")
                continue
            if not np.allclose(got, expected[which], rtol=1e-4, atol=1e-5):
                problems.append(f"client {index} request {n}: wrong answer")

    before = statistics(server, "qa")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = statistics(server, "qa")
    assert problems == []
    inferences, executions = (after[k] - before[k] for k in ("inference_count", "execution_count"))
    assert inferences == 16 * 200
    assert executions < inferences  # batches of more than one request ran


def statistics(server: Server, model: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{server.http}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return {k: int(stats[k]) for k in ("inference_count", "execution_count")}


def test_killed_under_load_clients_get_errors_never_wrong_answers_and_a_restart_serves(serving_python, built, tmp_path):
    session = Session(built["qa"][0])
    feed = encoded(session, ["Who built the bridge?"], [SHORT])
    expected = session.run(feed)["start_logits"]
    served = Server(serving_python, [built["qa"][0]], tmp_path / "first.log")
    assert served.status("/v2/health/ready") == 200
    triton = served.triton_pid()
    models = children(triton)  # the Python backend's model processes
    assert models
    outcomes = under_load(served, feed, expected, lambda: os.kill(triton, signal.SIGKILL))
    assert outcomes["wrong"] == 0 and outcomes["right"] > 0 and outcomes["error"] > 0, outcomes
    assert served.process.wait(30) == 1 and "the Triton server stopped by itself" in served.text()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in models) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in models), "model processes outlived their server"

    again = Server(serving_python, [built["qa"][0]], tmp_path / "second.log", ports=(served.http_port, served.grpc_port))
    np.testing.assert_allclose(infer(grpcclient, again.grpc, "qa", feed, ["start_logits"])["start_logits"], expected,
                               rtol=1e-5, atol=1e-6)
    # Ctrl-C under load: a clean stop (the module's server shows SIGTERM's)
    outcomes = under_load(again, feed, expected, lambda: again.process.send_signal(signal.SIGINT))
    assert outcomes["wrong"] == 0 and outcomes["right"] > 0, outcomes
    assert again.process.wait(90) == 0 and "stopping: in-flight requests finish first" in again.text()


def under_load(server: Server, feed: dict[str, np.ndarray], expected: np.ndarray, event) -> dict[str, int]:
    """Four clients asking for 1.5 s, then `event`, then 1.5 s more: how many answers were right or wrong,
    and how many calls failed."""
    outcomes = {"right": 0, "wrong": 0, "error": 0}
    stop = threading.Event()

    def client() -> None:
        connection = httpclient.InferenceServerClient(server.http, connection_timeout=5, network_timeout=5)
        while not stop.is_set():
            try:
                got = connection.infer("qa", infer_inputs(httpclient, feed)).as_numpy("start_logits")
                outcomes["right" if np.allclose(got, expected, rtol=1e-4, atol=1e-5) else "wrong"] += 1
            except Exception:  # noqa: BLE001 - a refused or cut connection, whatever the client library raises
                outcomes["error"] += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    event()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    return outcomes


def test_serve_without_triton_says_what_to_install(built, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else find_spec(name, *a))
    assert main(["serve", str(built["qa"][0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "megatron-deploy[serve]" in err


def test_serve_refuses_numpy_2_and_a_taken_port(built, monkeypatch, capsys, tmp_path):
    from exporter.delivery import serve

    monkeypatch.setattr(np, "__version__", "2.0.0")
    monkeypatch.setattr(serve.TritonInstall, "find", classmethod(lambda cls: cls(*[tmp_path] * 4)))
    assert main(["serve", str(built["qa"][0])]) == 2
    assert "numpy<2" in capsys.readouterr().err
    monkeypatch.setattr(serve, "check_numpy", lambda: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(built["qa"][0]), "--port", str(taken.getsockname()[1])]) == 2
    assert "choose another with --port" in capsys.readouterr().err
    assert main(["serve", str(built["qa"][0]), "--grpc-port", "70000"]) == 2


def test_signed_int8_served_with_a_public_key_answers_alone_as_among_others(serving_python, built_int8, tmp_path):
    """`serve --public-key`: the signed artifact is served, an unsigned one is not. Its int8 graph's answer
    to a request is bitwise the same alone and among 15 others sent at once (the dynamic form scales per
    call, so it is not batched with other requests)."""
    from test_runtime_session import copy_artifact
    from test_signing import key_pair

    qa = copy_artifact(built_int8["qa"][0], tmp_path / "qa")
    unsigned = copy_artifact(built_int8["nsp"][0], tmp_path / "nsp")
    private, public = key_pair(tmp_path, "ours")
    assert main(["sign", str(qa), "--key", str(private)]) == 0
    served = Server(serving_python, [qa, unsigned], tmp_path / "signed.log", "--public-key", str(public))
    try:
        log = served.text()
        assert "  qa: READY" in log and "  qa-text: READY" in log
        assert "  nsp: UNAVAILABLE" in log and "not signed" in log
        session = Session(qa)
        probe = encoded(session, ["Who built the bridge?"], ["Engineers from the town built it."])
        rng = np.random.default_rng(0)
        others = [{**probe, "input_ids": rng.integers(5, session.manifest.config["vocab_size"], probe["input_ids"].shape)}
                  for _ in range(15)]
        alone = infer(httpclient, served.http, "qa", probe, ["start_logits"])["start_logits"]
        for _ in range(3):
            answers: dict[int, np.ndarray] = {}

            def send(index: int, feed: dict[str, np.ndarray]) -> None:
                answers[index] = infer(httpclient, served.http, "qa", feed, ["start_logits"])["start_logits"]

            threads = [threading.Thread(target=send, args=(i, f)) for i, f in enumerate([*others[:8], probe, *others[8:]])]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert np.array_equal(answers[8], alone)
        assert ask(grpcclient, served.grpc, "qa-text", {"question": "Who built it?", "context": SHORT})["answer"]
    finally:
        assert served.stop() == 0, served.text()[-3000:]


def test_the_load_benchmark_runs_from_the_serving_environment(serving_python):
    """As the README runs it, with none of the exporter's own libraries (a serving install has no torch)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_load.py"
    blocked = ("import runpy, sys\nfor m in ('torch', 'onnx', 'onnxscript', 'onnx_ir', 'safetensors', 'polygraphy'):\n"
               "    sys.modules[m] = None\nsys.argv = [sys.argv[1], '--help']\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([str(serving_python), "-c", blocked, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--concurrency" in result.stdout, result.stderr[-2000:]


def test_tritons_cuda_complaints_on_a_cpu_host_are_one_note():
    import io

    from exporter.delivery.serve import relay

    said: list[str] = []
    log = (b'E1202 server.cc:241] "CudaDriverHelper has not been initialized."\n'
           b'I1202 model_lifecycle.cc:849] "successfully loaded \'qa\'"\n'
           b'W1202 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, pinned memory pool will '
           b'not be available: CUDA driver version is insufficient for CUDA runtime version"\n')
    relay(io.BytesIO(log), said.append)
    assert said == ["note: no usable GPU here; Triton's CUDA start-up warnings are expected and left out",
                    'I1202 model_lifecycle.cc:849] "successfully loaded \'qa\'"']
