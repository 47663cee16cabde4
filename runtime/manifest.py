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
from .files import read_json, sha256_of, write_atomically

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

    def verify_files(self, directory: Path, only: list[str] | None = None) -> None:
        """Every listed file (or those of `only`) exists beside the manifest with the recorded size and hash."""
        for name, expected in self.files.items():
            if only is not None and name not in only:
                continue
            path = directory / name
            if path.is_symlink() and directory.resolve() not in path.resolve().parents:
                raise UserError(f"{path}: a symlink leading out of the artifact's folder (to {path.resolve()}); "
                                "an artifact's files live in its folder")
            if not path.exists():
                raise UserError(f"{path}: missing (the manifest of {self.name!r} lists it)")
            if path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
                raise UserError(f"{path}: contents differ from the manifest (sha256 mismatch); the file was "
                                "modified or replaced after the build; rebuild the artifact")

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
        data = read_json(path, "manifest")
        if not isinstance(data.get("format"), int):
            raise UserError(f"{path}: not an artifact manifest (no format version)")
        if data["format"] > FORMAT_VERSION:
            raise UserError(f"{path}: manifest format {data['format']} is newer than this runtime reads "
                            f"({FORMAT_VERSION}); upgrade the runtime package")
        try:
            schema.check(data)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
