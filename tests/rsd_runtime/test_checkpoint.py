"""load_checkpoint on small random models saved by transformers, and on broken copies of them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rsd_runtime.checkpoint import CheckpointError, UnsupportedCheckpoint, load_checkpoint
from rsd_runtime.model_config import UnsupportedModel

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MODELS = {
    "llama-f32": (LlamaConfig, LlamaForCausalLM, torch.float32, {}),
    "llama-bf16": (LlamaConfig, LlamaForCausalLM, torch.bfloat16, {"attention_bias": True}),
    "mistral-f16": (MistralConfig, MistralForCausalLM, torch.float16, {}),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, torch.float32, {"tie_word_embeddings": True}),
    # vocab 256, hidden 64: ~700 KB, so 100 KB shards give an index and several files
    "llama-sharded": (LlamaConfig, LlamaForCausalLM, torch.bfloat16, {"vocab_size": 256, "hidden_size": 64,
                                                                      "intermediate_size": 128}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (checkpoint dir, the model's state_dict)."""
    out = {}
    for name, (config_cls, model_cls, dtype, kw) in MODELS.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**{**SMALL, **kw})).to(dtype)
        path = tmp_path_factory.mktemp(name)
        shard = {"max_shard_size": "100KB"} if name.endswith("sharded") else {}
        model.save_pretrained(path, safe_serialization=True, **shard)
        out[name] = (path, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.fixture
def copy_of(saved, tmp_path):
    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(saved[name][0], dst)
        return dst
    return copy


@pytest.mark.parametrize("name", MODELS)
def test_loads_every_tensor_with_its_shape_and_values(saved, name):
    path, state = saved[name]
    ckpt = load_checkpoint(path, progress=False)
    shapes = ckpt.config.tensor_shapes()
    assert ckpt.names() == list(shapes)
    dtype = str(MODELS[name][2]).removeprefix("torch.")
    for n in ckpt.names():
        assert ckpt.shape(n) == shapes[n]
        assert ckpt.dtype(n) == dtype
        t = ckpt.get(n)
        assert t.dtype == MODELS[name][2] and torch.equal(t, state[n]), n
    assert ckpt.config.dtype == dtype
    assert ckpt.tokenizer_path is None


def test_sharded_checkpoint_reads_across_files(saved):
    path, _ = saved["llama-sharded"]
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(path, progress=False)
    assert {ckpt._entries[n].file.name for n in ckpt.names()} == set(shards)


def test_tied_checkpoint_has_no_lm_head_and_may_carry_one(saved, copy_of):
    path, state = saved["qwen2-tied"]
    ckpt = load_checkpoint(path, progress=False)
    assert ckpt.config.tie_word_embeddings and "lm_head.weight" not in ckpt.names()
    assert ckpt.config.qkv_bias and "model.layers.0.self_attn.q_proj.bias" in ckpt.names()
    with_head = copy_of("qwen2-tied")
    _rewrite(with_head / "model.safetensors", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    assert load_checkpoint(with_head, progress=False).names() == ckpt.names()


def test_extra_tensors_are_ignored(copy_of):
    path = copy_of("llama-f32")
    _rewrite(path / "model.safetensors",
             lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4, dtype=torch.float64)})
    ckpt = load_checkpoint(path, progress=False)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in ckpt.names()


def test_tokenizer_json_is_found(copy_of):
    path = copy_of("llama-f32")
    (path / "tokenizer.json").write_text("{}")
    assert load_checkpoint(path, progress=False).tokenizer_path == path / "tokenizer.json"


def test_no_progress_bar_without_a_terminal(saved, capsys):
    load_checkpoint(saved["llama-sharded"][0], progress=True)
    assert capsys.readouterr().err == ""


def test_unknown_tensor_name(saved):
    ckpt = load_checkpoint(saved["llama-f32"][0], progress=False)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        ckpt.get("model.layers.9.mlp.up_proj.weight")


# ---------------------------------------------------------------- bad inputs


def test_missing_tensor_is_named_with_the_files_searched(copy_of):
    path = copy_of("llama-f32")
    gone = "model.layers.1.mlp.up_proj.weight"
    _rewrite(path / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensor\(s\) the config expects: {gone}; "
                                              r"searched model.safetensors"):
        load_checkpoint(path, progress=False)


def test_missing_tensor_in_a_sharded_checkpoint(copy_of):
    path = copy_of("llama-sharded")
    gone = "model.norm.weight"
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][gone]
    _rewrite(shard, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=rf"{gone}; searched model-00001-of-0000\d.safetensors, "):
        load_checkpoint(path, progress=False)


def test_wrong_shape_names_tensor_expected_got_and_field(copy_of):
    path = copy_of("llama-f32")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(path / "model.safetensors", lambda t: {**t, name: torch.zeros(24, 32)})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, progress=False)
    msg = str(err.value)
    assert "config contradicts weights" in msg
    assert f"{name} is [24, 32] (expected [16, 32])" in msg
    assert "num_key_value_heads * head_dim = 2 * 8 = 16 in config.json" in msg


def test_config_contradicting_weights_names_the_field(copy_of):
    path = copy_of("llama-f32")
    _edit_config(path, hidden_size=64)  # head_dim stays 8, as transformers wrote it
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, progress=False)
    msg = str(err.value)
    assert "config contradicts weights: hidden_size=64 in config.json but model.embed_tokens.weight is [97, 32] " \
           "(expected [97, 64])" in msg
    assert msg.count("hidden_size=64") == 1  # one reason per disagreeing field, not per tensor


@pytest.mark.parametrize("edit, expected", [
    ({"vocab_size": 100}, "vocab_size=100 in config.json but model.embed_tokens.weight is [97, 32]"),
    ({"intermediate_size": 48}, "intermediate_size=48 in config.json but model.layers.0.mlp.gate_proj.weight"),
    ({"num_attention_heads": 2}, "num_attention_heads * head_dim = 2 * 8 = 16 in config.json"),
    ({"num_hidden_layers": 1}, "num_hidden_layers=1 in config.json but the checkpoint has layers up to model.layers.1"),
    ({"num_hidden_layers": 3}, "num_hidden_layers=3 in config.json but the checkpoint has 2 layers"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=false, so lm_head.weight must be stored"),
])
def test_other_contradictions(copy_of, edit, expected):
    path = copy_of("qwen2-tied" if "tie_word_embeddings" in edit else "llama-f32")
    _edit_config(path, **edit)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, progress=False)
    assert expected in str(err.value)


def test_unknown_architecture_is_both_error_kinds(copy_of):
    path = copy_of("llama-f32")
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedCheckpoint) as err:
        load_checkpoint(path, progress=False)
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, UnsupportedModel)
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert str(path / "config.json") in str(err.value)


def test_missing_shard_file_is_named(copy_of):
    path = copy_of("llama-sharded")
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"1 of the 3 shards listed in model.safetensors.index.json are "
                                              r"missing: model-00002-of-00003.safetensors"):
        load_checkpoint(path, progress=False)


def test_unsupported_tensor_dtype(copy_of):
    path = copy_of("llama-f32")
    name = "model.norm.weight"
    _rewrite(path / "model.safetensors", lambda t: {**t, name: t[name].double()})
    with pytest.raises(CheckpointError, match=rf"{name} in model.safetensors has dtype F64; supported: float32"):
        load_checkpoint(path, progress=False)


def test_corrupt_file(copy_of):
    path = copy_of("llama-f32")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(path, progress=False)


def test_empty_missing_and_weightless_directories(tmp_path, copy_of):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no config.json"):
        load_checkpoint(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint directory at .*nowhere"):
        load_checkpoint(tmp_path / "nowhere", progress=False)
    path = copy_of("llama-f32")
    (path / "model.safetensors").rename(path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"no safetensors files: expected model.safetensors or "
                                              r"model.safetensors.index.json \(found weights.safetensors"):
        load_checkpoint(path, progress=False)


def test_bad_config_json(copy_of):
    path = copy_of("llama-f32")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(path, progress=False)
    _edit_config_text(path, {**SMALL, "model_type": "llama", "num_key_value_heads": 3})
    with pytest.raises(CheckpointError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        load_checkpoint(path, progress=False)


def _rewrite(file: Path, change) -> None:
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    _edit_config_text(path, {**json.loads((path / "config.json").read_text()), **changes})


def _edit_config_text(path: Path, cfg: dict) -> None:
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name, bad", [("llama-f32", float("nan")), ("llama-sharded", float("-inf"))])
def test_nan_or_inf_weights_are_named_on_load(copy_of, name, bad):
    from rsd_runtime.model_config import ModelConfig

    path = copy_of(name)
    files = sorted(path.glob("*.safetensors"))
    target = "model.layers.1.mlp.down_proj.weight"
    for f in files:
        weights = load_file(f)
        if target in weights:
            weights[target][3, 5] = bad
            weights[target][7, 0] = bad
            save_file(weights, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {target} holds 2 non-finite values \(first: -?(nan|inf) "
                                              r"at index \[3, 5\]\)"):
        load_checkpoint(path, progress=False)  # small: checked by default
    with pytest.raises(CheckpointError, match=target):
        load_checkpoint(path, progress=False, check_weights=True)
    ckpt = load_checkpoint(path, progress=False, check_weights=False)  # told not to: headers only
    assert isinstance(ckpt.config, ModelConfig)


def test_config_json_that_is_a_list_is_refused_by_name(copy_of):
    path = copy_of("llama-f32")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json must hold a JSON object, got a list"):
        load_checkpoint(path, progress=False)
