"""Checkpoint: a Hugging Face safetensors checkpoint directory, indexed and validated, read lazily.

    ckpt = load_checkpoint("path/to/model")      # config.json + model.safetensors[.index.json]
    ckpt.config.num_layers, ckpt.names()          # what the model needs, in HF order
    ckpt.get("model.layers.0.mlp.up_proj.weight") # read now, from its shard, in its own dtype

Loading reads only the safetensors headers; every expected tensor is checked for presence, shape
and dtype before anything else runs, so a bad checkpoint fails here with the reason, not later on
a card. Extra tensors (rotary inv_freq, a tied lm_head) are ignored.

Errors: everything is a CheckpointError. An architecture or rope type the runtime does not run is
an UnsupportedCheckpoint, which is both a CheckpointError and the model_config.UnsupportedModel
that ModelConfig.from_hf raised, so callers may catch either.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from rsd_runtime.model_config import ModelConfig, UnsupportedModel
from rsd_runtime.tokenizer import tokenizer_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors header dtype -> ours; anything else (F64, integer, FP8 ...) is refused.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
# How config.json names the quantities behind each dimension (see ModelConfig.tensor_dims).
_HF_FIELDS = {"vocab_size": ("vocab_size",), "hidden_size": ("hidden_size",),
              "intermediate_size": ("intermediate_size",), "q_size": ("num_attention_heads", "head_dim"),
              "kv_size": ("num_key_value_heads", "head_dim")}
_OURS = {"num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads"}
_MAX_LISTED = 5
# Checkpoints up to this size are checked for NaN and Inf on load unless told otherwise: reading 1 GiB
# twice costs about a second here, while a NaN found only as "logits contain NaN" names no tensor.
CHECK_ON_LOAD_BYTES = 1 << 30


class CheckpointError(ValueError):
    """The checkpoint directory cannot be used: missing files or tensors, or a config the weights contradict."""


class UnsupportedCheckpoint(CheckpointError, UnsupportedModel):
    """The checkpoint is well-formed but describes a model this runtime does not run."""


@dataclass(slots=True, frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors header code: F32, BF16, ...


class Checkpoint:
    def __init__(self, path: Path, config: ModelConfig, entries: dict[str, _Entry], tokenizer_path: Path | None):
        self.path = path
        self.config = config
        self.tokenizer_path = tokenizer_path
        self._entries = entries  # only the tensors the config expects

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        return SAFETENSORS_DTYPES[self._entry(name).dtype]

    def get(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        # Opened per call: safe_open maps the file and parses only its header, and no file handle
        # stays open between reads of a 100-shard checkpoint.
        with safe_open(entry.file, framework="pt") as f:
            return f.get_tensor(name)

    def check_weights(self, progress: bool = False) -> None:
        """Read every tensor; CheckpointError names the first (in HF order) that holds NaN or Inf."""
        from tqdm import tqdm

        for name in tqdm(self.names(), desc="checking weights", unit="tensor", file=sys.stderr, leave=False,
                         disable=not (progress and sys.stderr.isatty())):
            check_finite(name, self.get(name), self.path)

    def num_bytes(self) -> int:
        return sum(torch.Size(e.shape).numel() * _ITEMSIZE[e.dtype] for e in self._entries.values())

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of the {self.config.architecture} model in {self.path}; "
                           f"see names()") from None

    def __repr__(self) -> str:
        c = self.config
        return f"Checkpoint({str(self.path)!r}, {c.architecture}, {c.num_layers} layers, {len(self._entries)} tensors)"


def check_finite(name: str, tensor: torch.Tensor, where: Path | str = "") -> None:
    """Raise CheckpointError if ``tensor`` holds NaN or Inf, naming it, the count and the first place."""
    bad = ~torch.isfinite(tensor)
    if not bad.any():
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape))
    value = tensor.reshape(-1)[flat].item()
    raise CheckpointError(f"{where}: tensor {name} holds {int(bad.sum())} non-finite values "
                          f"(first: {value} at index {list(index)}); the checkpoint is corrupt")


def load_checkpoint(path: str | Path, *, progress: bool = True, check_weights: bool | None = None) -> Checkpoint:
    """Index and validate a checkpoint; ``check_weights`` also reads every tensor for NaN and Inf
    (None: only checkpoints up to CHECK_ON_LOAD_BYTES)."""
    path = Path(path)
    config = _read_config(path)
    files, weight_map = _weight_files(path)
    found = _index(files, progress)
    for name, file in weight_map.items():
        if name in found and found[name].file.name != file:
            raise CheckpointError(f"{path}: {INDEX_FILE} puts {name} in {file}, but it is in {found[name].file.name}")
    entries = _check(path, config, found, files)
    ckpt = Checkpoint(path, config, entries, tokenizer_file(path))
    if check_weights or (check_weights is None and ckpt.num_bytes() <= CHECK_ON_LOAD_BYTES):
        ckpt.check_weights(progress)
    return ckpt


def _read_config(path: Path) -> ModelConfig:
    if not path.exists():
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with config.json and safetensors files")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint keeps it beside its "
                              f"safetensors files")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc
    try:
        return ModelConfig.from_hf(cfg)
    except UnsupportedModel as exc:
        raise UnsupportedCheckpoint(f"{cfg_file}: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from exc


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files to read, and the index's name -> file map (empty for one file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} of the {len(names)} shards listed in {INDEX_FILE} "
                                  f"are missing: {_listing(missing)}")
        return [path / n for n in names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], {}
    others = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {_listing(others)}, but no index naming them)" if others else ""
    raise CheckpointError(f"{path}: no safetensors files: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _index(files: list[Path], progress: bool) -> dict[str, _Entry]:
    """Read every file's header: name -> file, shape, dtype. No tensor data is read."""
    from tqdm import tqdm

    found: dict[str, _Entry] = {}
    bar = tqdm(files, desc="indexing checkpoint", unit="file", file=sys.stderr, leave=False,
               disable=not (progress and sys.stderr.isatty()))
    for file in bar:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in found:
                        raise CheckpointError(f"{file.parent}: tensor {name} is in both {found[name].file.name} "
                                              f"and {file.name}")
                    found[name] = _Entry(file, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    return found


def _check(path: Path, config: ModelConfig, found: dict[str, _Entry], files: list[Path]) -> dict[str, _Entry]:
    """The expected tensors, each present, of the expected shape and a supported dtype."""
    dims = config.tensor_dims()
    missing = [n for n in dims if n not in found]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config expects: "
                              f"{_listing(missing)}; searched {_listing([f.name for f in files])}"
                              f"{_missing_hint(config, found, missing)}")
    _check_layer_count(path, config, found)
    for name in dims:
        if found[name].dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} in {found[name].file.name} has dtype {found[name].dtype}; "
                                  f"supported: {', '.join(SAFETENSORS_DTYPES.values())} (quantized checkpoints "
                                  f"are not supported)")
    reasons: dict[str, str] = {}  # the disagreeing config field -> the first tensor that shows it
    for name, d in dims.items():
        if found[name].shape != tuple(config.dim(q) for q in d):
            field, shown = _contradiction(config, name, d, found[name].shape)
            reasons.setdefault(field or shown, f"{field} in config.json but {shown}" if field else shown)
    if reasons:
        listed = list(reasons.values())
        raise CheckpointError(f"{path}: config contradicts weights: " + "; ".join(listed[:_MAX_LISTED])
                              + (" ..." if len(listed) > _MAX_LISTED else ""))
    return {n: found[n] for n in dims}


def _contradiction(config: ModelConfig, name: str, dims: tuple[str, ...], got: tuple[int, ...]) -> tuple[str, str]:
    """(the config.json field(s) that disagree, or "" when one cannot tell; the tensor's shape against ours)."""
    expected = tuple(config.dim(q) for q in dims)
    shown = f"{name} is {list(got)} (expected {list(expected)})"
    if len(got) != len(expected):
        return "", shown
    quantity, e = next((q, e) for q, e, g in zip(dims, expected, got) if e != g)
    fields = _HF_FIELDS[quantity]
    values = [getattr(config, _OURS.get(f, f)) for f in fields]
    if len(fields) == 1:
        return f"{fields[0]}={e}", shown
    return f"{' * '.join(fields)} = {' * '.join(map(str, values))} = {e}", shown


def _check_layer_count(path: Path, config: ModelConfig, found: dict[str, _Entry]) -> None:
    layers = {int(m.group(1)) for n in found if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and max(layers) >= config.num_layers:
        raise CheckpointError(f"{path}: config contradicts weights: num_hidden_layers={config.num_layers} in "
                              f"config.json but the checkpoint has layers up to model.layers.{max(layers)}")


def _missing_hint(config: ModelConfig, found: dict[str, _Entry], missing: list[str]) -> str:
    if "lm_head.weight" in missing:
        return "; config.json says tie_word_embeddings=false, so lm_head.weight must be stored"
    layers = {int(m.group(1)) for n in found if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and all(re.match(r"model\.layers\.(\d+)\.", n) for n in missing) and max(layers) + 1 < config.num_layers:
        return (f"; config contradicts weights: num_hidden_layers={config.num_layers} in config.json but the "
                f"checkpoint has {max(layers) + 1} layers")
    return ""


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
