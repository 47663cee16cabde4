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
MAX_LABELS = 2**17  # a classifier's outputs; its weights (hidden x labels) enter the memory check too
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
            raise UserError(f"config: id2label must be an object of labels, got {type(self.id2label).__name__}")
        _count("labels in id2label", len(self.id2label))
        self.id2label = {_label_index(k): _label(v) for k, v in self.id2label.items()}
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
        classifier = (hidden + 1) * self.num_labels
        return tables + layers * per_layer + hidden * hidden + self.vocab_size + classifier

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
            values["id2label"] = {i: f"LABEL_{i}" for i in range(_count("num_labels", data["num_labels"]))}
        if "label2id" in data and "id2label" not in data:
            label2id = data["label2id"]
            if not isinstance(label2id, dict):
                raise UserError(f"config: label2id must be an object of label -> id, got {type(label2id).__name__}")
            _count("labels in label2id", len(label2id))
            values["id2label"] = {_label_index(i): label for label, i in label2id.items()}
        for name in ("bos_token_id", "eos_token_id"):  # HF allows a list of ids; the first ends generation
            value = values.get(name)
            if isinstance(value, list):
                if not value:
                    raise UserError(f"config: {name} is an empty list; give an id, a list of ids or null")
                value = values[name] = value[0]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"config: {name} must be a token id (an integer of at least 0), got {value!r}")
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


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LABELS:
        raise UserError(f"config: {name} must be an integer from 1 to {MAX_LABELS}, got {value!r}")
    return value


def _label_index(key: Any) -> int:
    """A label's number: an integer, or its decimal string (JSON object keys are strings)."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 7:
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    raise UserError(f"config: a label's id must be an integer, got {key!r}")


def _label(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"config: a label must be a string, got {type(value).__name__}")
    return str(value)
