"""MegatronBERT's configuration: the fields of a Hugging Face `config.json`, checked once on the way in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.files import read_json

# Bounds far beyond any BERT (the 3.9B one: vocabulary 30592, hidden 2560, 48 layers, 40 heads): a
# config outside them is a mistake or an attack, not a model, and would ask the allocator for terabytes.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**15, "num_hidden_layers": 512, "num_attention_heads": 1024,
               "intermediate_size": 2**17, "max_position_embeddings": 2**16, "type_vocab_size": 2**10}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclass
class MegatronBertConfig:
    """Defaults are NVIDIA's released 345M model (Hugging Face's MegatronBertConfig defaults)."""

    vocab_size: int = 29056
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id2label, dict):
            raise UserError(f"config: id2label must be an object of labels, got {self.id2label!r}")
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        for name, most in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
                raise UserError(f"config: {name} must be an integer from 1 to {most}, got {value!r}")
        for name, (low, high) in (("layer_norm_eps", (0.0, 1.0)), ("initializer_range", (0.0, 10.0))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
                raise UserError(f"config: {name} must be a number between {low} and {high}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"config: hidden_act {self.hidden_act!r} is not supported "
                            f"(supported: {', '.join(ACTIVATIONS)})")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise UserError(f"config: problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if sorted(self.id2label) != list(range(len(self.id2label))) or not self.id2label:
            raise UserError(f"config: id2label must number its labels 0..N-1, got {sorted(self.id2label)}")
        if self.problem_type == "regression" and self.num_labels != 1:
            raise UserError(f"config: a regression head has 1 label, this config has {self.num_labels}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise UserError(f"config: pad_token_id {self.pad_token_id} is outside the vocabulary "
                            f"of {self.vocab_size}")

    @property
    def parameters(self) -> int:
        """How many weights the model with its largest head (the LM's) has: what its memory is made of."""
        hidden, inner, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * hidden * hidden + 2 * hidden * inner + 9 * hidden + inner
        tables = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * hidden
        return tables + layers * per_layer + hidden * hidden + self.vocab_size

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> MegatronBertConfig:
        """Read a Hugging Face MegatronBERT config; refuse what would change the architecture we build."""
        model_type = data.get("model_type", "megatron-bert")
        if model_type != "megatron-bert":
            raise UserError(f"config: model_type is {model_type!r}, expected 'megatron-bert'")
        if data.get("add_cross_attention"):
            raise UserError("config: add_cross_attention=true (an encoder-decoder) is not supported")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"config: position_embedding_type {data['position_embedding_type']!r} is not "
                            "supported (only 'absolute')")
        if data.get("chunk_size_feed_forward", 0) not in (0, None):
            raise UserError("config: chunk_size_feed_forward is a training-time memory option; set it to 0")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "id2label" not in values and "num_labels" in data:
            values["id2label"] = {i: f"LABEL_{i}" for i in range(int(data["num_labels"]))}
        if "label2id" in data and "id2label" not in data:
            values["id2label"] = {int(i): label for label, i in data["label2id"].items()}
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        try:
            return cls(**values)
        except TypeError as err:  # a field of the wrong type that the checks above did not reach
            raise UserError(f"config: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> MegatronBertConfig:
        return cls.from_hf_dict(read_json(Path(path), "config"))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as Hugging Face writes it (labels keyed by strings, plus label2id and model_type)."""
        data = asdict(self)
        data["id2label"] = {str(i): label for i, label in self.id2label.items()}
        data["label2id"] = self.label2id
        data["model_type"] = "megatron-bert"
        return data
