"""`runtime.Session`: load an artifact, check what it is given, run it, and answer in plain terms.

    s = runtime.Session("artifacts/qa.onnx")      # or the manifest qa.json, or qa.plan
    s.answer("Who wrote it?", "It was written by Ada.")

The manifest beside the model file says everything: which head, which graphs with which inputs, the
shape limits, the tokenizer. Files are opened once, checked against their recorded hashes and loaded
from those descriptors (runtime.pinned). Sessions are safe to share between threads: nothing in them
changes after construction (the windowing tokenizers are made once per setting, under a lock).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from tokenizers import Encoding, Tokenizer

from . import backend_choice, openvino_backend, tasks, tensorrt_backend
from .backends import Backend, OnnxRuntimeBackend
from .errors import UserError
from .feeds import INDEX_INPUTS
from .files import JSON_LIMIT, Vanished, read_regular
from .generation import Generator, SamplingOptions
from .heads import DYNAMIC_AXES, HEADS
from .manifest import Manifest
from .manifest_schema import QUANTIZED
from .pinned import PinnedArtifact, find_manifest

SESSION_BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
MAX_CHARS = 100_000  # about 25,000 tokens: 200 windows of a 128-token qa artifact
OPEN_ATTEMPTS = 5  # a publish that replaces the version being opened sends the reader to the new one


class Session:
    _truncating: Tokenizer | None = None  # the tokenizer that cuts texts to fit, if the session truncates

    def __init__(self, path: str | Path, backend: str | Backend = "auto", providers: list[str] | None = None,
                 public_key: str | Path | None = None, graphs: Sequence[str] | None = None,
                 precision: str | None = None, max_chars: int = MAX_CHARS, truncate: bool = False):
        """`backend`: "auto", "onnxruntime", "openvino", "tensorrt", or an object that runs the graphs
        elsewhere (such as a Triton server's models); then only the tokenizer needs to be beside the manifest.
        `public_key`: open only an artifact signed with its private key (NAME.sig; needs model-signing).
        `graphs`: load only these of the artifact's graphs (a server model that runs one of them).
        `precision`: what OpenVINO computes float graphs in, "bf16" or "fp32" (default: bf16 where the
        CPU has it natively); `Session.precision` says what runs.
        `max_chars`: the longest text a helper takes, in characters, refused before tokenizing (a long
        document is read in windows, each a full call of the graph).
        `truncate`: cut a text longer than the artifact's window to fit (its end; of a pair, the longer
        one's) instead of refusing it. A question to answer() and a prompt to generate() are never cut."""
        path = Path(path)
        if isinstance(backend, str) and backend not in SESSION_BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(SESSION_BACKENDS)}")
        self.max_chars = _count("max_chars", max_chars, 1)
        external = not isinstance(backend, str)
        pinned = self._pin(path, external, public_key)
        try:
            self.manifest = pinned.manifest
            self.directory = pinned.directory
            self.head = HEADS[self.manifest.head]
            if not self.manifest.validation.get("passed"):
                raise UserError(f"{self.directory / f'{self.manifest.name}.json'}: this artifact failed validation; "
                                "rebuild it")
            unknown = set(graphs or ()) - set(self.manifest.graphs)
            if unknown:
                raise UserError(f"no graph {', '.join(sorted(unknown))} in this artifact (it has "
                                f"{', '.join(self.manifest.graphs)})")
            try:
                self._backend = (backend if not isinstance(backend, str)
                                 else self._open_backend(pinned, path, backend, providers,
                                                         set(graphs or self.manifest.graphs), precision))
            except UserError:
                raise
            except Exception as err:  # a graph its backend cannot load or run: the artifact's fault
                raise UserError(f"the {self.manifest.name} artifact's graphs cannot be opened here "
                                f"({_first_line(err)}); rebuild it, or check it with `python -m exporter verify`"
                                ) from None
            tokenizer = pinned.read(self.manifest.tokenizer["file"])
        finally:
            pinned.close()  # the backends hold what they loaded
        if precision is not None and not isinstance(self._backend, openvino_backend.OpenVinoBackend):
            raise UserError(f"precision={precision!r} is for the openvino backend (this session runs {self._backend.name})")
        self._ready(tokenizer)
        if _flag("truncate", truncate):
            self._truncating = self._cutting(strategy="longest_first")

    @classmethod
    def staged(cls, manifest: Manifest, folder: Path, backend: Backend, encodings: dict[Any, Any] | None = None
               ) -> Session:
        """An artifact still being built, to measure it before it is validated and published: its manifest
        as it stands, its tokenizer file in `folder`, its graphs run by `backend`. Production opens
        published artifacts with Session(path), which checks every file. `encodings`: a memo of the
        tokenizer's work, shared by the sessions of one build's forms (the same tokenizer), so that the
        examples measured on each are encoded once."""
        session = cls.__new__(cls)
        session.max_chars = MAX_CHARS
        session.manifest, session.directory, session.head = manifest, folder, HEADS[manifest.head]
        session._backend = backend
        session._ready(read_regular(folder / manifest.tokenizer["file"], JSON_LIMIT))
        session._encodings = encodings
        return session

    def _ready(self, tokenizer: bytes) -> None:
        """What every session holds beside its manifest and backend."""
        self.backend: str = self._backend.name
        self.precision: str = ("bf16" if self.manifest.precision not in QUANTIZED
                               and getattr(self._backend, "float_precision", None) == "bf16" else self.manifest.precision)
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer.decode())
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
            raise UserError(f"{self.directory / self.manifest.tokenizer['file']}: not a tokenizer ({err})") from None
        self.max_length: int = self.manifest.tokenizer["max_length"]
        self.special = {role: t["id"] for role, t in self.manifest.tokenizer["special_tokens"].items()}
        self.id2label = {int(i): label for i, label in self.manifest.config["id2label"].items()}
        self._window_tokenizers: dict[tuple[int, int], Tokenizer] = {}
        self._lock = threading.Lock()
        self._encodings: dict[Any, Any] | None = None  # see staged()

    @staticmethod
    def _pin(path: Path, external: bool, public_key: str | Path | None) -> PinnedArtifact:
        """The artifact's files, opened and checked. A publish may replace the version between finding the
        manifest and opening its files: then open the version the name now gives."""
        manifest_path = find_manifest(path)
        for attempt in range(OPEN_ATTEMPTS):
            try:
                pinned = PinnedArtifact(manifest_path, None if public_key is None else Path(public_key))
                pinned.check([pinned.manifest.tokenizer["file"]] if external else None)
                return pinned
            except Vanished:
                again = find_manifest(path)
                if again == manifest_path or attempt == OPEN_ATTEMPTS - 1:
                    raise
                manifest_path = again
        raise AssertionError("unreachable")

    def _open_backend(self, pinned: PinnedArtifact, path: Path, backend: str, providers: list[str] | None,
                      graphs: set[str], precision: str | None) -> Backend:
        """TensorRT for engines (a .plan path, backend="tensorrt", or "auto" where TensorRT and a GPU
        exist and the artifact has engines); OpenVINO when asked (int8: the Q/DQ graph, which it runs in
        int8); ONNX Runtime with its best provider when asked or on a GPU; "auto" on a CPU: the faster
        of ONNX Runtime and a validated OpenVINO form (runtime.backend_choice)."""
        engines = {graph: pinned.path(e["file"]) for graph, e in self.manifest.engines.items() if graph in graphs}
        wanted = backend == "tensorrt" or (backend == "auto" and path.suffix == ".plan")
        if wanted or (backend == "auto" and engines and tensorrt_backend.usable() is None):
            if not engines:
                raise UserError(f"the {self.manifest.name} artifact has no TensorRT engines (it was built where "
                                "TensorRT was absent); open its .onnx or use backend='onnxruntime'")
            reason = tensorrt_backend.usable()
            if reason:
                raise UserError(f"cannot run TensorRT engines here: {reason}; use backend='onnxruntime'")
            return tensorrt_backend.TensorRTBackend(engines, self.manifest.tensorrt)
        chosen = {graph: g for graph, g in self.manifest.graphs.items() if graph in graphs}
        files = {graph: pinned.path(g["file"]) for graph, g in chosen.items()}
        qdq_names = {graph: g.get("tensorrt_file", g["file"]) for graph, g in chosen.items()}
        validated = self.manifest.validation.get("forms", {})

        def openvino() -> Backend:  # bf16 by default only where the build validated it
            outputs = {graph: self.manifest.output_names(graph) for graph in chosen}
            # OpenVINO follows no link out of a graph's folder to its external data: real copies then
            data = [f"{name}.data" for name in qdq_names.values() if f"{name}.data" in self.manifest.files]
            folder = pinned.copies([*qdq_names.values(), *data]) if data else pinned.folder
            return openvino_backend.OpenVinoBackend({graph: folder / name for graph, name in qdq_names.items()},
                                                    outputs,
                                                    precision or (None if validated.get("openvino bf16") else "fp32"))

        def onnxruntime() -> Backend:
            return OnnxRuntimeBackend(files, providers, {graph: pinned.path(name) for graph, name in qdq_names.items()})

        if backend == "openvino" or (backend == "auto" and precision is not None):
            return openvino()
        if backend == "auto" and providers is None and OnnxRuntimeBackend.best_provider() == "CPUExecutionProvider":
            use_openvino = openvino_backend.usable() is None and validated.get("openvino")
            return backend_choice.fastest(self.manifest, {"onnxruntime": onnxruntime,
                                                          **({"openvino": openvino} if use_openvino else {})})
        return onnxruntime()

    def __repr__(self) -> str:
        return (f"Session({self.manifest.name!r}, head={self.head.name!r}, backend={self.backend!r}, "
                f"precision={self.precision!r})")

    # ---- raw calls ---------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray], graph: str | None = None) -> dict[str, np.ndarray]:
        """Run one graph on named numpy arrays; returns named numpy arrays (see the manifest)."""
        graph = self._graph(graph)
        self.check_inputs(inputs, graph)
        return self.call(graph, inputs)

    def call(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Run a graph on inputs already checked. A backend failure on them is the artifact's: its graph
        disagrees with its manifest (say, smaller tables than the manifest states)."""
        try:
            return self._backend.run(graph, feed, keep)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"the {self.manifest.name} artifact's {graph} graph failed on inputs its manifest "
                            f"allows ({_first_line(err)}); rebuild it, or check it with `python -m exporter verify`"
                            ) from None

    def _graph(self, graph: str | None) -> str:
        graphs = self.manifest.graphs
        if graph is None:
            if len(graphs) > 1:
                raise UserError(f"this artifact has graphs {', '.join(graphs)}: pass graph=...")
            return next(iter(graphs))
        if graph not in graphs:
            raise UserError(f"no graph {graph!r} in this artifact (it has {', '.join(graphs)})")
        return graph

    def check_inputs(self, inputs: dict[str, Any], graph: str) -> None:
        if not isinstance(inputs, dict):
            raise UserError(f"inputs must be a dict of input names to numpy arrays, got {type(inputs).__name__}")
        declared = {t["name"]: t for t in self.manifest.graphs[graph]["inputs"]}
        if set(inputs) != set(declared):
            missing, extra = set(declared) - set(inputs), set(inputs) - set(declared)
            raise UserError("inputs do not match the artifact's: "
                            + "; ".join(f"{what} {', '.join(sorted(names))}" for what, names in
                                        (("missing", missing), ("unexpected", extra)) if names))
        sizes: dict[str, int] = {}
        for name, spec in declared.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise UserError(f"input {name} must be a numpy array, got {type(value).__name__}")
            if str(value.dtype) != spec["dtype"]:
                raise UserError(f"input {name} has dtype {value.dtype}, expected {spec['dtype']}")
            shape = list(value.shape)
            if len(shape) != len(spec["shape"]):
                raise UserError(f"input {name} has shape {shape}, expected [{', '.join(map(str, spec['shape']))}]")
            for axis, size in zip(spec["shape"], shape):
                if isinstance(axis, int) and size != axis:
                    raise UserError(f"input {name} has shape {shape}, expected [{', '.join(map(str, spec['shape']))}]")
                if isinstance(axis, str) and sizes.setdefault(axis, size) != size:
                    raise UserError(f"input {name}: axis {axis} is {size} here but {sizes[axis]} in another input")
        self._check_limits(sizes)
        self._check_values(inputs)

    def _check_values(self, inputs: dict[str, np.ndarray]) -> None:
        for name, value in inputs.items():
            if value.size == 0:
                continue
            if name == "attention_mask" and not ((value == 0) | (value == 1)).all():
                raise UserError(f"attention_mask must hold only 0 and 1, got values from {value.min()} to {value.max()}")
            if name in INDEX_INPUTS:
                size = self.manifest.config[INDEX_INPUTS[name]]
                if value.min() < 0 or value.max() >= size:
                    raise UserError(f"{name} must lie in [0, {size}) (the model's {INDEX_INPUTS[name]}), got values "
                                    f"from {value.min()} to {value.max()}")

    def _check_limits(self, sizes: dict[str, int]) -> None:
        limits = dict(self.manifest.shape_limits)
        if "past_sequence" in limits:
            limits["total_sequence"] = [a + b for a, b in zip(limits["sequence"], limits["past_sequence"])]
        for axis in DYNAMIC_AXES:
            if axis in sizes and axis in limits and not limits[axis][0] <= sizes[axis] <= limits[axis][2]:
                raise UserError(f"{axis} of {sizes[axis]} is outside this artifact's limits "
                                f"[{limits[axis][0]}, {limits[axis][2]}]")

    # ---- tokenization ------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, add_special_tokens: bool = True
               ) -> list[Encoding]:
        for text in [*texts, *(pairs or [])]:
            self._text(text)
        if any(not t.strip() for t in texts):
            raise UserError("empty text: give at least one word")
        items: list[Any] = list(zip(texts, pairs)) if pairs is not None else list(texts)
        # Texts for the encoder (with special tokens) are cut if the session truncates; prompts never
        tokenizer = (self._truncating if self._truncating is not None and add_special_tokens else self.tokenizer)
        encodings = self._memo(("encode", add_special_tokens, *items),
                               lambda: tokenizer.encode_batch(items, add_special_tokens=add_special_tokens))
        for text, encoding in zip(texts, encodings):
            if len(encoding.ids) > self.max_length:
                raise UserError(f"a text of {len(encoding.ids)} tokens is longer than this artifact's "
                                f"{self.max_length} (text starts {text[:40]!r}); shorten it or rebuild with "
                                "a larger --max-sequence")
        return encodings

    def _memo(self, key: tuple[Any, ...], encode: Callable[[], Any]) -> Any:
        if self._encodings is None:
            return encode()
        if key not in self._encodings:
            self._encodings[key] = encode()
        return self._encodings[key]

    def batch(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """input_ids, attention_mask and token_type_ids, padded on the artifact's side to the longest
        encoding (at least the artifact's minimum sequence)."""
        length = max(max(len(e.ids) for e in encodings), self.manifest.shape_limits["sequence"][0])
        left = self.manifest.tokenizer["padding_side"] == "left"
        arrays = {name: np.zeros((len(encodings), length), dtype=np.int64)
                  for name in ("input_ids", "attention_mask", "token_type_ids")}
        arrays["input_ids"][:] = self.special.get("pad", 0)
        for row, e in enumerate(encodings):
            span = slice(length - len(e.ids), length) if left else slice(0, len(e.ids))
            arrays["input_ids"][row, span] = e.ids
            arrays["attention_mask"][row, span] = 1
            arrays["token_type_ids"][row, span] = e.type_ids
        return arrays

    def _run_encoder(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Run the single graph over encodings of any number: sorted by length and cut into chunks of the
        artifact's max batch, each padded only to its own longest, so that short texts do not pay for long
        ones. Outputs come back in the given order, a sequence axis padded with zeros to the longest of all
        (as `batch` pads the inputs)."""
        graph = self._graph(None)
        names = {t["name"] for t in self.manifest.graphs[graph]["inputs"]}
        along_sequence = {t["name"] for t in self.manifest.graphs[graph]["outputs"] if "sequence" in t["shape"][1:2]}
        length = max(max(len(e.ids) for e in encodings), self.manifest.shape_limits["sequence"][0])
        left = self.manifest.tokenizer["padding_side"] == "left"
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        step = self.manifest.shape_limits["batch"][2]
        outputs: dict[str, np.ndarray] = {}
        for first in range(0, len(order), step):
            rows = order[first:first + step]
            chunk = self.run({k: v for k, v in self.batch([encodings[i] for i in rows]).items() if k in names}, graph)
            for name, value in chunk.items():
                if name not in along_sequence:
                    outputs.setdefault(name, np.zeros((len(order), *value.shape[1:]), value.dtype))[rows] = value
                    continue
                size = value.shape[1]
                full = outputs.setdefault(name, np.zeros((len(order), length, *value.shape[2:]), value.dtype))
                full[rows, slice(length - size, length) if left else slice(0, size)] = value
        return outputs

    def _helper(self, name: str) -> None:
        if name not in self.head.helpers:
            raise UserError(f"{name}() is not a helper of the {self.head.name} head; "
                            f"it has: {', '.join(h + '()' for h in self.head.helpers)}")

    # ---- task helpers ------------------------------------------------------------------------

    def _texts(self, value: str | Sequence[str]) -> tuple[list[str], bool]:
        """One text or a list of them: the list, and whether it was one. Each is checked before any work."""
        if isinstance(value, str):
            return [self._text(value)], True
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
            raise UserError(f"expected a text or a list of texts, got {type(value).__name__}"
                            + (" holding other things" if isinstance(value, (list, tuple)) else ""))
        if not value:
            raise UserError("an empty list: give at least one text")
        return [self._text(t) for t in value], False

    def _pairs(self, texts: list[str], pairs: str | Sequence[str]) -> list[str]:
        seconds, _ = self._texts(pairs)
        if len(seconds) != len(texts):
            raise UserError(f"{len(texts)} texts but {len(seconds)} pairs")
        return seconds

    def _text(self, text: Any) -> str:
        """A string of at most max_chars that is valid Unicode (no lone surrogates, which no tokenizer reads)."""
        if not isinstance(text, str):
            raise UserError(f"expected text, got {type(text).__name__}")
        if len(text) > self.max_chars:
            raise UserError(f"a text of {len(text)} characters is longer than this session takes ({self.max_chars}; "
                            "Session(max_chars=...) raises it)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise UserError(f"the text is not valid Unicode ({err.reason} at character {err.start})") from None
        return text

    def classify(self, text: str | list[str], text_pair: str | list[str] | None = None, top_k: int | None = 1
                 ) -> Any:
        """Label a text (or text pair): {"label", "score"}, or the top_k of them (None: all labels)."""
        self._helper("classify")
        texts, single = self._texts(text)
        if top_k is not None:
            _count("top_k", top_k, 1)
        pairs = None if text_pair is None else self._pairs(texts, text_pair)
        outputs = self._run_encoder(self.encode(texts, pairs))
        results = tasks.classify(outputs["logits"], self.id2label, self.manifest.config.get("problem_type"), top_k)
        return results[0] if single else results

    def next_sentence(self, a: str | list[str], b: str | list[str]) -> Any:
        """Does B follow A: {"is_next", "score"} (score: probability that it does)."""
        self._helper("next_sentence")
        texts, single = self._texts(a)
        pairs = self._pairs(texts, b)
        outputs = self._run_encoder(self.encode(texts, pairs))
        results = tasks.next_sentence(outputs["logits" if "logits" in outputs else "seq_relationship_logits"])
        return results[0] if single else results

    def embed(self, texts: str | list[str], pooling: str = "cls") -> np.ndarray:
        """Sentence vectors: [hidden] for one text, [n, hidden] for a list."""
        self._helper("embed")
        if pooling not in tasks.POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of {', '.join(tasks.POOLINGS)}")
        items, single = self._texts(texts)
        encodings = self.encode(items)
        arrays, outputs = self.batch(encodings), self._run_encoder(encodings)
        vectors = tasks.embed(outputs["last_hidden_state"], outputs["pooler_output"], arrays["attention_mask"],
                              pooling)
        return vectors[0] if single else vectors

    def fill_mask(self, text: str | list[str], top_k: int = 5) -> Any:
        """The top_k fillers of each [MASK]: {"token", "token_str", "score", "sequence"}."""
        self._helper("fill_mask")
        items, single = self._texts(text)
        _count("top_k", top_k, 1)
        if "mask" not in self.special:
            raise UserError("this artifact's tokenizer has no [MASK] token")
        mask_id = self.special["mask"]
        encodings = self.encode(items)
        for item, e in zip(items, encodings):
            if mask_id not in e.ids:
                raise UserError(f"no [MASK] token in {item[:40]!r}")
        arrays, outputs = self.batch(encodings), self._run_encoder(encodings)
        logits = outputs["logits" if "logits" in outputs else "prediction_logits"]
        results = tasks.fill_mask(logits, arrays["input_ids"], mask_id, self.tokenizer, top_k)
        return results[0] if single else results

    def choose(self, prompt: str | list[str], choices: list[str] | list[list[str]]) -> Any:
        """Pick the best continuation: {"choice": index, "text", "scores"}."""
        self._helper("choose")
        prompts, single = self._texts(prompt)
        options = [cast(list[str], list(choices))] if single else [list(c) for c in cast(list[list[str]], choices)]
        if len(options) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(options)} lists of choices")
        low, _, high = self.manifest.shape_limits["choices"]
        results = []
        for p, opts in zip(prompts, options):  # one call per prompt: choice counts may differ
            if not low <= len(opts) <= high:
                raise UserError(f"{len(opts)} choices; this artifact takes {low} to {high}")
            arrays = self.batch(self.encode([p] * len(opts), opts))
            outputs = self.run({k: v[None] for k, v in arrays.items()})
            results += tasks.choose(outputs["logits"], [opts])
        return results[0] if single else results

    def tag(self, text: str | list[str], aggregation: str | None = None) -> Any:
        """Entities with labels, scores and character offsets (aggregation: none, simple, first, max, average)."""
        self._helper("tag")
        aggregation = aggregation or self.manifest.task.get("aggregation", "simple")
        if aggregation not in tasks.AGGREGATIONS:
            raise UserError(f"aggregation {aggregation!r} is not one of {', '.join(tasks.AGGREGATIONS)}")
        items, single = self._texts(text)
        encodings = self.encode(items)
        outputs = self._run_encoder(encodings)
        results = tasks.tag(outputs["logits"], encodings, items, self.id2label, aggregation)
        return results[0] if single else results

    def answer(self, question: str | list[str], context: str | list[str], top_k: int = 1,
               max_answer_len: int | None = None, doc_stride: int | None = None,
               handle_impossible_answer: bool = False) -> Any:
        """Answer spans of the context: {"answer", "score", "start", "end"} (character offsets), or a
        list of top_k. Contexts longer than the artifact's window are read in overlapping windows."""
        self._helper("answer")
        questions, single = self._texts(question)
        contexts = self._pairs(questions, context)
        _count("top_k", top_k, 1)
        if max_answer_len is None:
            max_answer_len = self.manifest.task.get("max_answer_length", 30)
        _count("max_answer_len", max_answer_len, 1)
        _flag("handle_impossible_answer", handle_impossible_answer)
        if doc_stride is None:  # the recipe's, shrunk to fit a small window
            doc_stride = min(self.manifest.task.get("doc_stride", 128), self.max_length // 4)
        elif not 0 <= _count("doc_stride", doc_stride, 0) < self.max_length // 2:
            raise UserError(f"doc_stride {doc_stride} must be below half the window of {self.max_length} tokens")
        tokenizer = self._window_tokenizer(doc_stride)
        windows = [self._windows(tokenizer, doc_stride, q, c) for q, c in zip(questions, contexts)]
        outputs = self._run_encoder([w for item in windows for w in item])  # all items in one go
        results, first = [], 0
        for item, c in zip(windows, contexts):
            rows = slice(first, first + len(item))
            first += len(item)
            found = tasks.answer(outputs["start_logits"][rows], outputs["end_logits"][rows], item, c, top_k,
                                 max_answer_len, handle_impossible_answer)
            found = found or [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
            results.append(found[0] if top_k == 1 else found)
        return results[0] if single else results

    def _window_tokenizer(self, doc_stride: int) -> Tokenizer:
        key = (self.max_length, doc_stride)
        with self._lock:
            if key not in self._window_tokenizers:
                self._window_tokenizers[key] = self._cutting(stride=doc_stride, strategy="only_second")
            return self._window_tokenizers[key]

    def _cutting(self, **truncation: Any) -> Tokenizer:
        """A copy of the tokenizer that cuts its encodings to the artifact's window."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.enable_truncation(self.max_length, **truncation)
        return tokenizer

    def _windows(self, tokenizer: Tokenizer, doc_stride: int, question: str, context: str) -> list[Encoding]:
        if not question.strip() or not context.strip():
            raise UserError("question and context must both be non-empty")
        asked = len(self.tokenizer.encode(question, add_special_tokens=False).ids)
        room = self.max_length - asked - self.tokenizer.post_processor.num_special_tokens_to_add(True)
        if room < 1:
            raise UserError(f"the question is {asked} tokens, too long for this artifact's window of "
                            f"{self.max_length} tokens, which must also hold some context; shorten the question")
        if room <= doc_stride:
            raise UserError(f"the question is {asked} tokens, which leaves {room} tokens of context per window, "
                            f"no more than doc_stride {doc_stride}; pass a doc_stride below {room} or shorten "
                            "the question")
        try:
            first = self._memo(("window", self.max_length, doc_stride, question, context),
                               lambda: tokenizer.encode(question, context))
        except Exception as err:  # tokenizers raises a bare Exception when the stride cannot fit
            raise UserError(f"cannot window this context ({err}); use a smaller doc_stride or a shorter "
                            "question") from None
        return [first, *first.overflowing]

    def generate(self, prompt: str | list[str], max_new_tokens: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> Any:
        """Continue the prompt(s): greedy by default, or sampled (temperature, top_k, top_p, seed).
        Stops at [SEP] / eos, at any of the `stop` strings, or after max_new_tokens."""
        self._helper("generate")
        prompts, single = self._texts(prompt)
        generator = self._generator(max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop)
        texts = generator.run(prompts)
        return texts[0] if single else texts

    def generate_stream(self, prompt: str, max_new_tokens: int | None = None, do_sample: bool = False,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                        stop: Sequence[str] = ()) -> Iterator[str]:
        """Like generate() for one prompt, yielding the text piece by piece as it is produced."""
        self._helper("generate_stream")
        generator = self._generator(max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop)
        return generator.stream(self._text(prompt))

    def _generator(self, max_new_tokens: int | None, do_sample: bool, temperature: float, top_k: int,
                   top_p: float, seed: int | None, stop: Sequence[str]) -> Generator:
        if max_new_tokens is None:
            max_new_tokens = self.manifest.task.get("max_new_tokens", 32)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise UserError(f"stop must be a list of strings, got {stop!r}")
        _flag("do_sample", do_sample)
        if seed is not None:
            _count("seed", seed, 0)
        options = SamplingOptions(_count("max_new_tokens", max_new_tokens, 1), do_sample,
                                  _number("temperature", temperature), _count("top_k", top_k, 0),
                                  _number("top_p", top_p), seed, tuple(stop))
        return Generator(self, options)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def _first_line(err: Exception) -> str:
    """What a library's error says, in one line of reasonable length."""
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:300]


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return float(value)
