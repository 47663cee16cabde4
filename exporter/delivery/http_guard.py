"""The HTTP front of `exporter serve`: every HTTP request passes here before Triton sees it.

Triton 2.51's HTTP endpoint allocates an input's declared shape before it reads the input's JSON data,
so one request declaring `"shape": [1, 1099511627776]` kills the server (std::bad_alloc: every model
gone). Its gRPC endpoint compares sizes first and refuses, and so does its HTTP endpoint for binary
data; this guard closes the rest. An inference request's JSON header is read and checked: every input
has a shape of non-negative integers whose element count matches the data it carries (JSON values, or
`binary_data_size` bytes) and stays within the request size limit. Anything else gets 400 with one
line, and Triton never sees it. Every other request is passed through unchanged.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from runtime.errors import UserError

# bytes per element of Triton's fixed-size datatypes (BYTES elements carry their own lengths)
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                 "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "content-length", "host"}
MAX_DIMS = 8
MAX_REQUEST_BYTES = 64 << 20  # a 345M qa request of 64 x 512 tokens is 0.8 MB of JSON


class Refused(Exception):
    """A request that does not reach Triton: (HTTP status, one line)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_infer(body: bytes, header_length: str | None, encoding: str | None, limit: int) -> None:
    """Raise Refused unless the inference request `body` declares only what it carries."""
    body = _decoded(body, encoding, limit)
    if header_length is None:
        header, binary = body, 0
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise Refused(400, "Inference-Header-Content-Length must be a byte count within the request")
        header, binary = body[:int(header_length)], len(body) - int(header_length)
    try:
        request = json.loads(header)
    except (ValueError, RecursionError):
        raise Refused(400, "the request's header is not JSON") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        raise Refused(400, "the request needs a list of inputs")
    carried = 0
    for tensor in inputs:
        carried += _check_input(tensor, limit)
    if carried > binary:
        raise Refused(400, f"the inputs declare {carried} bytes of binary data; the request carries {binary}")


def _check_input(tensor: Any, limit: int) -> int:
    """The binary bytes this input declares (0 for JSON data)."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise Refused(400, "each input must be an object with a name")
    name, shape, datatype = tensor["name"], tensor.get("shape"), tensor.get("datatype")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise Refused(400, f"input {name}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if datatype not in ELEMENT_BYTES:
        raise Refused(400, f"input {name}: unknown datatype {datatype!r}")
    elements = math.prod(shape)
    if elements * ELEMENT_BYTES[datatype] > limit:
        raise Refused(400, f"input {name}: shape {shape} declares more than the {limit} bytes a request may hold")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Refused(400, f"input {name}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise Refused(400, f"input {name}: binary_data_size must be a byte count")
        if datatype != "BYTES" and size != elements * ELEMENT_BYTES[datatype]:
            raise Refused(400, f"input {name}: shape {shape} of {datatype} is {elements * ELEMENT_BYTES[datatype]} "
                          f"bytes; the request carries {size}")
        return size
    if "data" in tensor:
        found = _count(tensor["data"])
        if found != elements:
            raise Refused(400, f"input {name}: shape {shape} holds {elements} elements; the request carries {found}")
    elif "shared_memory_region" not in parameters:
        raise Refused(400, f"input {name}: no data")
    return 0


def _count(data: Any) -> int:
    """Elements of a (nested) JSON list, counted without recursion."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def _decoded(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as Triton will read it: gzip or deflate undone, to at most `limit` bytes."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise Refused(415, f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise Refused(400, f"the body is not valid {encoding}") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise Refused(413, f"the request inflates beyond the {limit} bytes a request may hold")
    return plain


class Guard(ThreadingHTTPServer):
    """Listens on `address` and passes checked requests on to Triton's HTTP endpoint at `upstream`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limit: int):
        self.upstream, self.limit = upstream, limit
        self.local = threading.local()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            super().__init__(address, _Handler)
        except OSError as err:
            raise UserError(f"cannot listen on {address[0]}:{address[1]} ({err.strerror}); choose another with "
                            "--port") from None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http-guard", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Guard

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            body = self._body()
            if self.command == "POST" and self.path.split("?", 1)[0].endswith("/infer"):
                check_infer(body, self.headers.get("Inference-Header-Content-Length"),
                            self.headers.get("Content-Encoding"), self.server.limit)
            status, headers, answer = self._forward(body)
        except Refused as refusal:
            status, headers, answer = refusal.status, [("Content-Type", "application/json")], json.dumps(
                {"error": str(refusal)}).encode()
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_POST = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise Refused(411, "send the request with a Content-Length (chunked bodies are not taken)")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            raise Refused(400, "Content-Length must be a byte count")
        if int(length) > self.server.limit:
            self.close_connection = True  # its body is not read
            raise Refused(413, f"the request is {length} bytes; at most {self.server.limit} are taken")
        return self.rfile.read(int(length))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (1, 2):  # once more on a fresh connection if the kept one went stale
            connection = getattr(self.server.local, "connection", None) or http.client.HTTPConnection(
                *self.server.upstream, timeout=600)
            self.server.local.connection = connection
            try:
                connection.request(self.command, self.path, body, headers)
                response = connection.getresponse()
                answer = response.read()
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                connection.close()
                self.server.local.connection = None
                if attempt == 2:
                    raise Refused(503, f"the Triton server is not answering ({type(err).__name__})") from None
                continue
            return response.status, [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP], answer
        raise AssertionError("unreachable")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet: Triton logs what reaches it."""
