"""exporter.delivery.http_guard on its own: what it refuses before Triton would see it, and that it passes the
rest through unchanged (a stand-in upstream here; tests/test_triton_server.py puts it before Triton)."""

from __future__ import annotations

import gzip
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from exporter.delivery.http_guard import Guard, Refused, check_infer

LIMIT = 1 << 20


def infer_body(shape, data=None, binary: bytes | None = None, datatype="INT64") -> tuple[bytes, str | None]:
    tensor = {"name": "input_ids", "shape": shape, "datatype": datatype}
    if binary is not None:
        tensor["parameters"] = {"binary_data_size": len(binary)}
        header = json.dumps({"inputs": [tensor]}).encode()
        return header + binary, str(len(header))
    tensor["data"] = data
    return json.dumps({"inputs": [tensor]}).encode(), None


@pytest.mark.parametrize("body, message", [
    (infer_body([1, 1099511627776], list(range(8))), "declares more than the 1048576 bytes"),
    (infer_body([1, 9], list(range(8))), "holds 9 elements; the request carries 8"),
    (infer_body([1, 8], [[1, 2], [3]]), "holds 8 elements; the request carries 3"),
    (infer_body([1, -8], list(range(8))), "shape must be a list of at most 8 non-negative integers"),
    (infer_body([1, True], [1]), "shape must be a list"),
    (infer_body([2] * 9, [1]), "at most 8"),
    (infer_body([1, 4], binary=np.ones(8, np.int64).tobytes()), "is 32 bytes; the request carries 64"),
    (infer_body([1, 8], [1] * 8, datatype="INT128"), "unknown datatype"),
    ((b"[" * 100_000, None), "not JSON"),
    ((b'{"inputs": 3}', None), "needs a list of inputs"),
])
def test_requests_declaring_more_than_they_carry_are_refused(body, message):
    with pytest.raises(Refused, match=message.replace("[", r"\[")) as refused:
        check_infer(*body, None, LIMIT)
    assert refused.value.status == 400


def test_binary_data_the_body_does_not_hold_and_compressed_bombs_are_refused():
    body, length = infer_body([1, 8], binary=np.ones(8, np.int64).tobytes())
    with pytest.raises(Refused, match="declare 64 bytes of binary data; the request carries 32"):
        check_infer(body[:-32], length, None, LIMIT)
    with pytest.raises(Refused, match="inflates beyond") as refused:
        check_infer(gzip.compress(b" " * (2 * LIMIT)), None, "gzip", LIMIT)
    assert refused.value.status == 413
    check_infer(gzip.compress(infer_body([1, 8], list(range(8)))[0]), None, "gzip", LIMIT)


def test_honest_requests_pass():
    check_infer(*infer_body([2, 4], [[1, 2, 3, 4], [5, 6, 7, 8]]), None, LIMIT)
    check_infer(*infer_body([1, 8], binary=np.ones(8, np.int64).tobytes()), None, LIMIT)
    check_infer(*infer_body([1], ['{"question": "q"}'], datatype="BYTES"), None, LIMIT)


class Upstream(BaseHTTPRequestHandler):
    """Echoes what reached it."""

    protocol_version = "HTTP/1.1"
    seen: list[bytes] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Upstream.seen.append(body)
        answer = json.dumps({"path": self.path, "bytes": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_the_guard_refuses_before_the_server_and_passes_the_rest_through():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    limit = 4096  # a refused body is not read: small enough to sit in the socket's buffers
    guard = Guard(("127.0.0.1", 0), upstream.server_address[:2], limit)
    guard.start()
    url = f"http://127.0.0.1:{guard.server_address[1]}"
    try:
        bad, _ = infer_body([1, 1099511627776], list(range(8)))
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/qa/infer", data=bad), timeout=10)
        assert refused.value.code == 400 and "declares more than" in json.loads(refused.value.read())["error"]
        assert Upstream.seen == []
        with pytest.raises(urllib.error.HTTPError) as too_big:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/qa/infer", data=b" " * (limit + 1)),
                                   timeout=10)
        assert too_big.value.code == 413 and Upstream.seen == []
        good, _ = infer_body([1, 8], list(range(8)))
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/qa/infer", data=good), timeout=10) as r:
            assert json.loads(r.read()) == {"path": "/v2/models/qa/infer", "bytes": len(good)}
        assert Upstream.seen == [good]
        with urllib.request.urlopen(f"{url}/v2/health/live", timeout=10) as r:
            assert r.status == 200
    finally:
        guard.shutdown()
        upstream.shutdown()
