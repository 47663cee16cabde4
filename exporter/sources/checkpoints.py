"""Loading the checkpoints users have into a reference head.

Three sources, one result (a `LoadedModel`):
- a Hugging Face model directory: config.json + model.safetensors (or sharded safetensors with their
  index, or pytorch_model.bin, read without running pickled code);
- a Megatron-LM checkpoint: NVIDIA's NGC release (the .zip with release/mp_rank_00/model_optim_rng.pt),
  that .pt itself, or a checkpoint folder or .zip of any tensor and pipeline parallelism (its ranks
  merged by exporter.sources.megatron_parallel); its names are mapped onto Hugging Face's by the tables below;
- a seeded random initialization of any config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from runtime.errors import UserError
from runtime.files import read_json, sha256_of

from exporter.sources import megatron_parallel
from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import HeadModel, build_head, init_weights

StateDict = dict[str, Tensor]


class CheckpointError(UserError):
    pass


@dataclass
class LoadReport:
    source: str
    kind: str  # "huggingface", "megatron" or "random"
    sha256: str  # of the checkpoint's files, or of the recipe for random weights
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not used by this head
    randomly_initialized: list[str] = field(default_factory=list)  # head weights the checkpoint lacked
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: HeadModel
    config: MegatronBertConfig
    report: LoadReport


# ---- Hugging Face directories ------------------------------------------------------------------

def read_hf_weights(directory: Path) -> tuple[StateDict, list[Path]]:
    """All tensors of a HF model directory, and the files they came from."""
    index = next((directory / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (directory / n).exists()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index}: not a valid shard index ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid shard index (weight_map must map names to files)")
        for name in set(weight_map.values()):  # a shard is a file of this directory, never one elsewhere
            if (directory / name).resolve().parent != directory.resolve():
                raise CheckpointError(f"{index}: shard {name} lies outside {directory}")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = [f for f in (directory / "model.safetensors", directory / "pytorch_model.bin") if f.exists()][:1]
    if not files:
        raise CheckpointError(f"{directory}: no model.safetensors, sharded safetensors or pytorch_model.bin")
    state: StateDict = {}
    for file in files:
        state.update(read_tensor_file(file))
    return state, files


def read_tensor_file(file: Path) -> StateDict:
    if not file.exists():
        raise CheckpointError(f"{file}: file is missing")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    state = load_pickle(file)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return state


class _Opaque:
    """Stands in for a Megatron-LM class pickled into a checkpoint (its args); we never need its value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_pickle(file: Path) -> Any:
    """torch.load with weights_only (no pickled code runs), letting through Megatron-LM's pickled args.

    Megatron checkpoints pickle an argparse.Namespace and sometimes Megatron-LM's own classes (enums in
    the args); those are replaced by inert placeholders so that Megatron-LM need not be installed.
    """
    allowed: list[Any] = [argparse.Namespace]
    for _ in range(64):  # one retry per distinct Megatron class
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if not match or not match.group(1).startswith("megatron."):
                raise CheckpointError(f"{file}: refusing to load, it needs code to unpickle "
                                      f"({match.group(1) if match else str(err).splitlines()[0]})") from None
            name = match.group(1)
            allowed.append((type(name.rsplit(".", 1)[1], (_Opaque,), {}), name))
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{file}: corrupt or truncated checkpoint ({str(err).splitlines()[0]})") from None
    raise CheckpointError(f"{file}: too many unknown classes pickled in it")


# ---- NVIDIA Megatron (NGC) checkpoints ---------------------------------------------------------

# Megatron name prefix -> Hugging Face name prefix. Megatron-LM called the encoder "transformer" in
# older releases and "encoder" later.
MEGATRON_PREFIXES = [
    ("language_model.embedding.word_embeddings.", "bert.embeddings.word_embeddings."),
    ("language_model.embedding.position_embeddings.", "bert.embeddings.position_embeddings."),
    ("language_model.embedding.tokentype_embeddings.", "bert.embeddings.token_type_embeddings."),
    ("language_model.transformer.final_layernorm.", "bert.encoder.ln."),
    ("language_model.encoder.final_layernorm.", "bert.encoder.ln."),
    ("language_model.transformer.layers.", "bert.encoder.layer."),
    ("language_model.encoder.layers.", "bert.encoder.layer."),
    ("language_model.pooler.dense.", "bert.pooler.dense."),
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.layernorm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.bias", "cls.predictions.bias"),
    ("binary_head.", "cls.seq_relationship."),
]

# Inside one layer: Megatron sub-module -> Hugging Face sub-module.
MEGATRON_LAYER = {
    "input_layernorm": "attention.ln",
    "attention.dense": "attention.output.dense",
    "self_attention.dense": "attention.output.dense",
    "post_attention_layernorm": "ln",
    "mlp.dense_h_to_4h": "intermediate.dense",
    "mlp.dense_4h_to_h": "output.dense",
}

# Megatron-args field -> config field, for checkpoints that store their args.
MEGATRON_ARGS = {
    "padded_vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
}

_QKV = re.compile(r"^(bert\.encoder\.layer\.\d+)\.(?:self_)?attention\.query_key_value\.(weight|bias)$")


def split_qkv(fused: Tensor, num_heads: int, version: float) -> list[Tensor]:
    """Megatron's fused query_key_value rows -> [query, key, value].

    Row order by checkpoint_version: 0 is [3, heads, head_size]; 1.x is [heads, head_size, 3];
    2.0 and later is [heads, 3, head_size]. All are brought to [3, heads, head_size] and split.
    """
    rest = fused.shape[1:]
    head_size = fused.shape[0] // (3 * num_heads)
    if version == 0:
        rows = fused.view(3, num_heads, head_size, *rest)
    elif version < 2.0:
        rows = fused.view(num_heads, head_size, 3, *rest).movedim(2, 0)
    else:
        rows = fused.view(num_heads, 3, head_size, *rest).movedim(1, 0)
    return list(rows.reshape(3, num_heads * head_size, *rest))


def flatten(tree: dict[str, Any], prefix: str = "") -> StateDict:
    flat: StateDict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, Tensor):
            flat[prefix + key] = value
    return flat


def rename_megatron(name: str) -> str | None:
    for old, new in MEGATRON_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    else:
        return None
    layer = re.match(r"^(bert\.encoder\.layer\.\d+)\.(.+)\.(weight|bias)$", name)
    if layer and layer.group(2) in MEGATRON_LAYER:
        return f"{layer.group(1)}.{MEGATRON_LAYER[layer.group(2)]}.{layer.group(3)}"
    return name


def megatron_config(tensors: StateDict, args: Any, given: dict[str, Any], source: Path) -> MegatronBertConfig:
    """The config the checkpoint states (tensor shapes, stored args) with `given` (a user's config.json,
    whole or partial) over it. The weights cannot tell the head count: it must be stated somewhere."""
    words = tensors["language_model.embedding.word_embeddings.weight"]
    stated: dict[str, Any] = {
        "vocab_size": words.shape[0], "hidden_size": words.shape[1],
        "max_position_embeddings": tensors["language_model.embedding.position_embeddings.weight"].shape[0],
        "num_hidden_layers": len({k.split(".")[3] for k in tensors if ".layers." in k}),
    }
    if "language_model.embedding.tokentype_embeddings.weight" in tensors:
        stated["type_vocab_size"] = tensors["language_model.embedding.tokentype_embeddings.weight"].shape[0]
    h_to_4h = next((v for k, v in tensors.items() if k.endswith("0.mlp.dense_h_to_4h.weight")), None)
    if h_to_4h is not None:
        stated["intermediate_size"] = h_to_4h.shape[0]
    for arg, name in MEGATRON_ARGS.items():
        if getattr(args, arg, None) is not None:
            stated[name] = getattr(args, arg)
    for name, value in given.items():
        # A smaller vocabulary is the true one inside Megatron's padded table; anything else must agree.
        if name in stated and value != stated[name] and not (name == "vocab_size" and value < stated[name]):
            raise CheckpointError(f"{source}: the config says {name} {value!r}, the checkpoint has {stated[name]!r}")
    if "num_attention_heads" not in {**stated, **given}:
        raise CheckpointError(f"{source}: the checkpoint does not state num_attention_heads (no Megatron args in "
                              "it) and its weights cannot tell it; pass --config CONFIG.json with num_attention_heads "
                              "(a Hugging Face MegatronBERT config.json, whole or just the fields to set)")
    return MegatronBertConfig.from_hf_dict({**stated, **given})


def check_member_names(file: Path, archive: zipfile.ZipFile) -> None:
    for info in archive.infolist():
        if info.filename.startswith(("/", "\\")) or ".." in PurePosixPath(info.filename.replace("\\", "/")).parts:
            raise CheckpointError(f"{file}: member {info.filename!r} points outside the archive")


def extract_member(file: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo, into: Path) -> Path:
    """One model_optim_rng.pt of the zip, copied out after its sizes were checked: it may not unpack to
    more than this machine's memory or far beyond what it compresses to (a 2 MB zip of 2 GB of zeros is
    no checkpoint)."""
    have = available_memory()
    if have is not None and member.file_size > have:
        raise CheckpointError(f"{file}: {member.filename} unpacks to {member.file_size / 2**30:.1f} GiB, more than "
                              f"the {have / 2**30:.1f} GiB this machine has available")
    if member.file_size > 2**26 and member.file_size > 20 * member.compress_size:
        raise CheckpointError(f"{file}: {member.filename} would unpack {member.compress_size} bytes to "
                              f"{member.file_size} ({member.file_size // max(1, member.compress_size)}:1); "
                              "weights do not compress like that, so this is no checkpoint")
    target = into / "model_optim_rng.pt"
    with archive.open(member) as source, target.open("wb") as copy:
        shutil.copyfileobj(source, copy, 2**20)
    return target


def select_ranks(files: list[PurePosixPath], tracker: str | None) -> dict[tuple[int, int], PurePosixPath]:
    """(tensor rank, stage) -> its model_optim_rng.pt, among `files` (paths inside the checkpoint): those of
    the iteration latest_checkpointed_iteration.txt names, or of the only one there is."""
    by_iteration: dict[PurePosixPath, dict[tuple[int, int], PurePosixPath]] = {}
    for file in files:
        rank = megatron_parallel.rank_of(file.parent.name)
        if rank is not None:
            by_iteration.setdefault(file.parent.parent, {})[rank] = file
    if not by_iteration:
        if len(files) == 1:  # a lone model_optim_rng.pt: one rank, whatever its folder is called
            return {(0, 0): files[0]}
        raise UserError(f"no .../mp_rank_00/model_optim_rng.pt in this {'zip' if files else 'checkpoint'}")
    if tracker is not None:
        wanted = megatron_parallel.iteration_folder(tracker)
        chosen = [folder for folder in by_iteration if folder.name == wanted]
        if not chosen:
            raise UserError(f"latest_checkpointed_iteration.txt names {wanted}, which holds no mp_rank_* folders")
        return by_iteration[chosen[0]]
    if len(by_iteration) > 1:
        raise UserError(f"ranks of several iterations ({', '.join(sorted(str(f) for f in by_iteration))}) and no "
                        "latest_checkpointed_iteration.txt to say which to read")
    return next(iter(by_iteration.values()))


def rank_readers(path: Path, stack: ExitStack) -> dict[tuple[int, int], Callable[[], Any]]:
    """How to load each rank's checkpoint dict of a Megatron .pt, .zip or directory, one at a time."""
    if path.suffix == ".pt":
        return {(0, 0): reader(path)}
    if path.suffix == ".zip":
        archive = stack.enter_context(zipfile.ZipFile(path))
        check_member_names(path, archive)
        members = {PurePosixPath(m.filename): m for m in archive.infolist() if m.filename.endswith("/model_optim_rng.pt")
                   or m.filename == "model_optim_rng.pt"}
        trackers = sorted((m for m in archive.namelist() if m.endswith("latest_checkpointed_iteration.txt")), key=len)
        tracker = archive.read(trackers[0]).decode(errors="replace") if trackers else None
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))

        def from_zip(member: zipfile.ZipInfo) -> Callable[[], Any]:
            return lambda: load_pickle(extract_member(path, archive, member, scratch))

        return {rank: from_zip(members[file]) for rank, file in select_ranks(list(members), tracker).items()}
    files = [PurePosixPath(p.relative_to(path).as_posix()) for pattern in ("*/model_optim_rng.pt", "*/*/model_optim_rng.pt")
             for p in path.glob(pattern)]
    tracker_file = path / "latest_checkpointed_iteration.txt"
    tracker = tracker_file.read_text(errors="replace") if tracker_file.exists() else None
    return {rank: reader(path / file) for rank, file in select_ranks(files, tracker).items()}


def reader(file: Path) -> Callable[[], Any]:
    return lambda: load_pickle(file)


def checked_checkpoint(checkpoint: Any, path: Path) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model", checkpoint), dict):
        raise CheckpointError(f"{path}: not a Megatron checkpoint (no 'model' dict)")
    return checkpoint


def is_megatron_folder(path: Path) -> bool:
    """Megatron-LM's layout: latest_checkpointed_iteration.txt, or mp_rank_* folders in it or one level down."""
    return (path / "latest_checkpointed_iteration.txt").exists() or any(path.glob("mp_rank_*")) \
        or any(path.glob("*/mp_rank_*"))


def read_megatron_tensors(path: Path) -> tuple[StateDict, Any, float]:
    """The checkpoint's tensors (Megatron's names, ranks and stages merged), its args and its version.
    Ranks are read one at a time and joined as they come, so memory holds about one copy of the model."""
    with ExitStack() as stack:
        try:
            readers = rank_readers(path, stack)
            tensor_ranks, stage_count = megatron_parallel.check_grid(list(readers), None)
            first = checked_checkpoint(readers[(0, 0)](), path)
            args, version = first.get("args"), float(first.get("checkpoint_version", 0) or 0)
            megatron_parallel.check_grid(list(readers), args)
            stages = []
            for stage in range(stage_count):
                ranks, names = [], []
                for tensor in range(tensor_ranks):
                    name = megatron_parallel.folder_name(tensor, stage, stage_count)
                    checkpoint = first if (tensor, stage) == (0, 0) else checked_checkpoint(readers[(tensor, stage)](), path)
                    if float(checkpoint.get("checkpoint_version", 0) or 0) != version:
                        raise UserError(f"{name} is of checkpoint_version {checkpoint.get('checkpoint_version')}, "
                                        f"mp_rank_00 of {version}")
                    ranks.append(flatten(checkpoint.get("model", checkpoint)))
                    names.append(name)
                    first = checkpoint = {}  # what else the rank saved (optimizer state) goes now
                stages.append(megatron_parallel.merge_tensor_parallel(ranks, version, names))
            tensors = megatron_parallel.merge_pipeline(stages, [f"stage {p}" for p in range(stage_count)],
                                                       getattr(args, "num_layers", None))
        except (zipfile.BadZipFile, EOFError) as err:
            raise CheckpointError(f"{path}: corrupt or truncated zip ({err})") from None
        except CheckpointError:
            raise
        except UserError as err:
            raise CheckpointError(f"{path}: {err}") from None
    return tensors, args, version


def read_megatron(file: Path, given: dict[str, Any]) -> tuple[StateDict, MegatronBertConfig, list[str]]:
    tensors, args, version = read_megatron_tensors(file)
    if "language_model.embedding.word_embeddings.weight" not in tensors:
        raise CheckpointError(f"{file}: not a Megatron BERT checkpoint (no language_model.embedding)")
    notes: list[str] = []
    config = megatron_config(tensors, args, given, file)

    state: StateDict = {}
    for name, tensor in tensors.items():
        new = rename_megatron(name)
        if new is None:
            state[name] = tensor  # reported as unused
            continue
        fused = _QKV.match(new.replace(".self_attention.", ".attention."))
        if fused:
            prefix, kind = fused.groups()
            for part, piece in zip(("query", "key", "value"), split_qkv(tensor, config.num_attention_heads, version)):
                state[f"{prefix}.attention.self.{part}.{kind}"] = piece
        else:
            state[new] = tensor
    # Megatron pads the embedding table (and so the LM bias) to a multiple of its parallel size.
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
        if name in state and state[name].shape[0] > config.vocab_size:
            notes.append(f"{name}: padded vocabulary of {state[name].shape[0]} cut to {config.vocab_size}")
            state[name] = state[name][: config.vocab_size]
    return state, config, notes


# ---- putting weights into a head ---------------------------------------------------------------

def normalize_names(state: StateDict) -> StateDict:
    """A checkpoint of the bare MegatronBertModel has no `bert.` prefix. HF's LM head adds
    `decoder.bias`, which is what its forward uses (the same tensor as `cls.predictions.bias` unless
    the checkpoint unties embeddings), so it is the LM bias when present."""
    if not any(k.startswith("bert.") for k in state) and any(k.startswith("embeddings.") for k in state):
        state = {(k if k.startswith(("cls.", "qa_outputs.", "classifier.")) else f"bert.{k}"): v
                 for k, v in state.items()}
    state = dict(state)
    if "cls.predictions.decoder.bias" in state:
        state["cls.predictions.bias"] = state.pop("cls.predictions.decoder.bias")
    return state


def is_head_weight(name: str) -> bool:
    """What a task head adds on top of the encoder; a checkpoint may lack these and still be usable."""
    return not name.startswith(("bert.embeddings.", "bert.encoder."))


def fill_head(model: HeadModel, state: StateDict, source: str, allow_random_head: bool
              ) -> tuple[list[str], list[str]]:
    """Copy `state` into `model`; returns (unused names, randomly initialized names)."""
    expected = model.state_dict()
    tied = model.bert.config.tie_word_embeddings and "cls.predictions.decoder.weight" in expected
    if tied:
        expected.pop("cls.predictions.decoder.weight")
        state.pop("cls.predictions.decoder.weight", None)
    unused = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    for name in missing:
        if not is_head_weight(name):
            raise CheckpointError(f"{source}: encoder weight {name} is missing from the checkpoint")
    if missing and not allow_random_head:
        raise CheckpointError(f"{source}: the checkpoint has no weights for this head ({', '.join(missing)}); "
                              "pass --allow-random-head (allow_random_head=True) to initialize them randomly, to "
                              "fine-tune or test it anyway")
    for name, tensor in expected.items():
        if name in state and state[name].shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                                  f"the config expects {tuple(tensor.shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    if tied:
        model.tie_weights()
    return unused, missing


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where the system does not say."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")), None)
    return None if kib is None else kib * 1024


def check_memory(config: MegatronBertConfig, source: str) -> None:
    """Refuse a model whose fp32 weights alone exceed the memory this machine has left."""
    need, have = config.parameters * 4, available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"{source}: the model's fp32 weights alone need {need / 2**30:.1f} GiB "
                              f"({config.parameters / 1e9:.2f}B parameters) and this machine has {have / 2**30:.1f} "
                              "GiB available; pass --skip-memory-check to try anyway")


def load(head: str, source: str | Path, *, config: MegatronBertConfig | dict[str, Any] | None = None,
         allow_random_head: bool = False, seed: int = 0, memory_check: bool = True) -> LoadedModel:
    """Build `head` with the weights at `source` (a HF directory; a Megatron folder, .zip or .pt). `config`, a
    config or just some of its fields (Hugging Face names), overrides what the checkpoint states."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (a Hugging Face model directory, "
                              "or a Megatron-LM checkpoint folder, .zip or model_optim_rng.pt)")
    given = config.to_hf_dict() if isinstance(config, MegatronBertConfig) else dict(config or {})
    notes: list[str] = []
    if path.is_dir() and not is_megatron_folder(path):
        kind = "huggingface"
        if not (path / "config.json").exists() and not given:
            raise CheckpointError(f"{path}: no config.json in this model directory (or pass --config)")
        stored = read_json(path / "config.json", "config") if (path / "config.json").exists() else {}
        config = MegatronBertConfig.from_hf_dict({**stored, **given})
        if memory_check:  # before the weights are read
            check_memory(config, str(path))
        state, files = read_hf_weights(path)
    elif path.is_dir() or path.suffix in (".zip", ".pt"):
        kind = "megatron"
        files = sorted(path.rglob("*.pt")) + sorted(path.glob("latest_*.txt")) if path.is_dir() else [path]
        state, config, notes = read_megatron(path, given)  # the config comes with the weights
        if memory_check:
            check_memory(config, str(path))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a Hugging Face model directory, "
                              "a Megatron .zip or a .pt)")
    model = build_head(head, config)
    init_weights(model, config.initializer_range, seed)  # only what the checkpoint lacks keeps these
    unused, missing = fill_head(model, normalize_names(state), str(path), allow_random_head)
    report = LoadReport(str(path), kind, sha256_of(*files), unused, missing, notes)
    return LoadedModel(model, model.bert.config, report)


def random_model(head: str, config: MegatronBertConfig, seed: int = 0, memory_check: bool = True) -> LoadedModel:
    """A head with seeded random weights (the same seed and config give the same weights)."""
    if memory_check:
        check_memory(config, "random weights")
    model = build_head(head, config)
    init_weights(model, config.initializer_range, seed)
    recipe = json.dumps({"config": config.to_hf_dict(), "seed": seed}, sort_keys=True)
    report = LoadReport(f"random(seed={seed})", "random", hashlib.sha256(recipe.encode()).hexdigest())
    return LoadedModel(model, model.bert.config, report)
