"""`python -m exporter serve ARTIFACT...`: a real Triton Inference Server on these artifacts.

The server is the `tritonserver` that the nvidia-pytriton wheel carries (`pip install .[serve]`). It has
only Triton's Python backend, so every graph is served in the Python-backend form of `exporter triton`
(runtime.Session running the artifact in process, read where it is), with NAME-text beside it. The
repository and the backend folder live in a temporary folder removed on exit.

Clients reach Triton's gRPC endpoint directly and its HTTP endpoint through exporter.delivery.http_guard, which
refuses requests that declare more than they carry (Triton's HTTP endpoint would allocate them and die).
With a public key, each model opens its artifact only if it is signed by the key's private key, checked on
the bytes it loads; an artifact that is not stays UNAVAILABLE, as a tampered one does.

On Ctrl-C or SIGTERM the server is asked to stop (it finishes in-flight requests first); the server
also stops if this process dies.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO
from dataclasses import dataclass
from pathlib import Path

import runtime
from runtime.errors import UserError
from runtime.heads import HEADS, parse_field
from runtime.manifest import Manifest
from runtime.pinned import find_manifest

from exporter.delivery.http_guard import MAX_REQUEST_BYTES, Guard
from exporter.delivery.triton import QUEUE_DELAY_US, RepositoryOptions, write_repository

INSTALL_HINT = "pip install 'megatron-deploy[serve]' (nvidia-pytriton's tritonserver)"
EXIT_TIMEOUT_S = 30  # how long in-flight requests get to finish on stop
# What Triton 2.51 logs at start on a machine without a usable GPU (it serves CPU models all the same)
NO_GPU_NOISE = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient",
                "CUDA driver is not available", "no CUDA-capable device")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001
    queue_delay_us: int | None = QUEUE_DELAY_US  # None: no dynamic batching
    public_key: Path | None = None  # serve only artifacts signed by its private key
    max_request_bytes: int = MAX_REQUEST_BYTES  # HTTP requests, and any input a request declares


@dataclass
class TritonInstall:
    """Where nvidia-pytriton keeps its server: the binary, its libraries and the Python backend."""

    server: Path
    libraries: Path
    python_backend: Path
    stub: Path  # the Python backend's stub for this Python version

    @classmethod
    def find(cls) -> TritonInstall:
        spec = importlib.util.find_spec("pytriton")  # located, not imported: its own code needs numpy<2
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"no Triton server here: {INSTALL_HINT}")
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(root / "bin" / "tritonserver", package.parent / "nvidia_pytriton.libs", root / "backends" / "python",
                    root / "python_backend_stubs" / version / "triton_python_backend_stub")
        missing = [str(p) for p in (found.server, found.libraries, found.python_backend, found.stub) if not p.exists()]
        if missing:
            raise UserError(f"the Triton server in {package} is incomplete (missing {', '.join(missing)}; "
                            f"no stub for Python {version}?): {INSTALL_HINT}")
        return found

    def backends(self, into: Path) -> Path:
        """A backend folder holding the Python backend with this Python's stub beside it, where the
        server looks for it."""
        python = into / "backends" / "python"
        shutil.copytree(self.python_backend, python)
        shutil.copy2(self.stub, python / "triton_python_backend_stub")
        return python.parent

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub embeds Python and takes its prefix from the `python3` first on PATH: make it this one.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libraries = [sysconfig.get_config_var("LIBDIR"), str(self.libraries), env.get("LD_LIBRARY_PATH")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        return env


def check_numpy() -> None:
    """The Python backend's stub in nvidia-pytriton 0.7 was built for numpy 1: under numpy 2 every tensor
    it hands over holds its first element repeated (measured here), hence pytriton's own numpy<2 pin."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise UserError(f"Triton's Python backend misreads tensors under numpy {numpy.__version__}; serve from an "
                        f"environment with numpy<2, which {INSTALL_HINT.split(' (')[0]} gives (keep it apart from "
                        "the exporter's)")


def site_dirs() -> tuple[str, ...]:
    """Where this Python finds its packages (the stub's Python does not read them itself), the runtime's
    first, so the models import the same runtime as this command."""
    dirs = [str(Path(runtime.__file__).resolve().parent.parent), *site.getsitepackages()]
    user = site.getusersitepackages()
    return tuple(dict.fromkeys(dirs + ([user] if os.path.isdir(user) else [])))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a listener is in the way, not TIME_WAIT
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another with {flag}") from None


def _die_with_parent() -> None:
    """In the server's process: receive SIGTERM when the serving process dies (Linux's PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _request(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_until_live(process: subprocess.Popen, http: str) -> None:
    """Triton opens its endpoints once every model has loaded or failed to."""
    while True:
        if process.poll() is not None:
            raise UserError(f"the Triton server exited during start-up (status {process.returncode}); "
                            "its log above says why")
        try:
            if _request(f"{http}/v2/health/live")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)


def model_states(http: str) -> dict[str, tuple[str, str]]:
    """model -> (state, reason) from the repository index."""
    status, body = _request(f"{http}/v2/repository/index", data=b"{}")
    if status != 200:
        raise UserError(f"the Triton server's repository index answered {status}: {body[:200]!r}")
    return {m["name"]: (m.get("state", "UNKNOWN"), m.get("reason", "")) for m in json.loads(body)}


def example_request(http: str, manifest: Manifest) -> str:
    """A curl command for the artifact's text model, with its helper's fields."""
    fields = [parse_field(f) for f in HEADS[manifest.head].fields]
    arguments = {name: ["..."] if is_list else "..." for name, required, is_list in fields if required}
    body = {"inputs": [{"name": "REQUEST", "shape": [1], "datatype": "BYTES", "data": [json.dumps(arguments)]}]}
    return f"curl {http}/v2/models/{manifest.name}-text/infer -d '{json.dumps(body)}'"


def relay(log: IO[bytes], say: Callable[[str], None]) -> None:
    """Triton's log, line by line, less its complaints about CUDA where there is no usable GPU: on a CPU
    host they read like failures and are expected (said once instead)."""
    noted = False
    for line in iter(log.readline, b""):
        text = line.decode(errors="replace").rstrip("\n")
        if any(noise in text for noise in NO_GPU_NOISE):
            if not noted:
                say("note: no usable GPU here; Triton's CUDA start-up warnings are expected and left out")
                noted = True
            continue
        say(text)


def say_now(message: str) -> None:
    print(message, flush=True)  # between the server's own log lines, also when written to a file


def serve(artifacts: list[Path], options: ServeOptions, say: Callable[[str], None] = say_now) -> int:
    """Serve until Ctrl-C or SIGTERM; 0 on such a stop, 1 when the server stops by itself or no model loads."""
    install = TritonInstall.find()
    check_numpy()
    check_port_free(options.host, options.port, "--port")
    check_port_free(options.host, options.grpc_port, "--grpc-port")
    manifests = [Manifest.load(find_manifest(a)) for a in artifacts]
    if options.public_key is not None and not options.public_key.is_file():
        raise UserError(f"--public-key {options.public_key}: no such file")
    with tempfile.TemporaryDirectory(prefix="megatron-serve-") as work:
        repository = Path(work) / "models"
        models = write_repository(artifacts, repository, RepositoryOptions(
            device="cpu", with_tokenizer=True, python_backend=True, queue_delay_us=options.queue_delay_us,
            in_place=True, site_dirs=site_dirs(), public_key=options.public_key))
        triton_http = ("127.0.0.1", free_port())  # reached only through the guard
        guard = Guard((options.host, options.port), triton_http, options.max_request_bytes)
        command = [str(install.server), f"--model-repository={repository}",
                   f"--backend-directory={install.backends(Path(work))}",
                   f"--http-address={triton_http[0]}", f"--http-port={triton_http[1]}",
                   f"--grpc-address={options.host}", f"--grpc-port={options.grpc_port}",
                   "--allow-metrics=false", "--exit-on-error=false", f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
        say(f"starting Triton with {len(models)} models: {', '.join(models)}")
        process = subprocess.Popen(command, env=install.environment(), start_new_session=True,
                                   preexec_fn=_die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        relaying = threading.Thread(target=relay, args=(process.stdout, say), daemon=True)
        relaying.start()
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
        http = f"http://{'[' + options.host + ']' if ':' in options.host else options.host}:{options.port}"
        guard.start()
        try:
            wait_until_live(process, http)
            states = model_states(http)
            for model in models:
                state, reason = states.get(model, ("UNAVAILABLE", "not in the repository index"))
                say(f"  {model}: {state}" + (f": {reason.splitlines()[0] if reason else ''}" if state != "READY" else ""))
            if not any(state == "READY" for state, _ in states.values()):
                say("no model loaded; stopping")
                return 1
            say(f"serving on HTTP {http} and gRPC {options.host}:{options.grpc_port} (Ctrl-C stops)")
            ready = [m for m in manifests if states.get(f"{m.name}-text", ("",))[0] == "READY"]
            if ready:
                say(f"  e.g. {example_request(http, ready[0])}")
            status = process.wait()
            say(f"the Triton server stopped by itself (status {status})")
            return 1
        except KeyboardInterrupt:
            say("stopping: in-flight requests finish first")
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop(process)
            relaying.join(10)
            guard.shutdown()
            guard.server_close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # Triton's graceful stop: no new requests, in-flight ones finish
        try:
            process.wait(EXIT_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # A server that died without stopping its models (SIGKILL, a crash) leaves their processes hung in exit
    # (seen: every thread waiting on a futex), holding their artifacts; they share the server's process group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
