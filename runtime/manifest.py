"""The artifact manifest (`NAME.json`): the one contract between the exporter, which writes it, and
the runtime, which trusts nothing else about an artifact.

It records what the artifact is (head, precision, model config and labels), how to call it (graph
files with their input/output names, dtypes and symbolic shapes, and the shape limits it was built
and validated for), how to tokenize for it, how well it matched PyTorch, and what produced it
(source checkpoint and hash, library versions), plus the size and sha256 of every file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import manifest_schema as schema
from .errors import UserError
from .files import JSON_LIMIT, parse_json, read_regular, sha256_of, write_atomically

FORMAT_VERSION = 1


@dataclass
class Manifest:
    name: str
    head: str
    precision: str  # fp32 | fp16 | int8
    config: dict[str, Any]  # the model's Hugging Face config (labels in id2label)
    # graph ("model", or "prefill"/"decode") -> {"file", "inputs", "outputs"}; tensors are
    # {"name", "dtype", "shape"} with dynamic axes named (see runtime.heads)
    graphs: dict[str, dict[str, Any]]
    shape_limits: dict[str, list[int]]  # dynamic axis -> [min, opt, max]
    tokenizer: dict[str, Any]  # file, max_length, padding_side, special tokens and their ids
    task: dict[str, Any] = field(default_factory=dict)  # defaults for the runtime's task helpers
    validation: dict[str, Any] = field(default_factory=dict)
    # task accuracy: evaluation data, deciding metric and bound, every form's scores (runtime.evaluation)
    accuracy: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {"bytes", "sha256"}
    versions: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)  # int8: calibration method, samples, forms
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # graph -> {"file": NAME.plan, ...}
    # what built the engines (version, gpu, compute_capability) and the ONNX parser check of the graphs
    tensorrt: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the checkpoint: path, kind, sha256, notes
    created: str = ""
    format: int = FORMAT_VERSION

    def record_files(self, directory: Path, names: list[str]) -> None:
        self.files = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_of(directory / n)}
                      for n in names}

    def output_names(self, graph: str) -> list[str]:
        """One graph's outputs, by the names the head declares."""
        return [t["name"] for t in self.graphs[graph]["outputs"]]

    def model_name(self, graph: str) -> str:
        """The name of the server model (Triton's) that serves one graph: NAME, or NAME-prefill ..."""
        return self.name if graph == "model" else f"{self.name}-{graph}"

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        return cls.from_bytes(read_regular(path, JSON_LIMIT), path)

    @classmethod
    def from_bytes(cls, raw: bytes, path: Path) -> Manifest:
        """The manifest in `raw`, read from `path` (which names it in errors, and whose name it must carry)."""
        data = parse_json(raw, path, "manifest")
        version = data.get("format")
        if isinstance(version, bool) or not isinstance(version, int):
            raise UserError(f"{path}: not an artifact manifest (no format version)")
        if version > FORMAT_VERSION:
            raise UserError(f"{path}: manifest format {version} is newer than this runtime reads "
                            f"({FORMAT_VERSION}); upgrade the runtime package")
        if version < 1:
            raise UserError(f"{path}: manifest field format: {version} is not a format version")
        try:
            schema.check(data, {f.name for f in fields(cls)})
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        if f"{data['name']}.json" != path.name:
            raise UserError(f"{path}: manifest field name: {data['name']!r} is not this file's name "
                            f"({path.stem!r})")
        return cls(**data)
