"""ModelConfig.from_hf against the configs transformers writes, and against the models it builds."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from rsd_runtime.model_config import MODEL_PRESETS, ModelConfig, UnsupportedModel, get_model_preset

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# (family config class, model class, extra config kwargs) for every layout the runtime reads
CASES = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}),
    "llama-head-dim": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 1, "head_dim": 16}),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama-biases": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}


def hf_dict(config_cls, **kw) -> dict:
    # num_key_value_heads given: Mistral's and Qwen2's class defaults (8, 32) exceed SMALL's 4 heads
    return config_cls(**{**SMALL, "num_key_value_heads": 4, **kw}).to_dict()


@pytest.mark.parametrize("case", CASES)
def test_tensor_shapes_match_the_model_transformers_builds(case):
    config_cls, model_cls, kw = CASES[case]
    hf = config_cls(**{**SMALL, **kw})
    cfg = ModelConfig.from_hf(hf.to_dict())
    model = model_cls(hf)
    # transformers keeps a tied lm_head in state_dict(); the file it saves leaves it out
    hf_shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()
                 if not (hf.tie_word_embeddings and n == "lm_head.weight")}
    assert cfg.tensor_shapes() == hf_shapes


def test_llama_gqa_fields():
    cfg = ModelConfig.from_hf(hf_dict(LlamaConfig, num_key_value_heads=2, rms_norm_eps=1e-5))
    assert (cfg.architecture, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 4, 2, 8)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.sliding_window) == (False, False, False, None)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 2048 and cfg.dtype == "float32"
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert cfg.tensor_shapes()["model.layers.1.self_attn.k_proj.weight"] == (16, 32)


def test_head_dim_given_explicitly_is_used():
    cfg = ModelConfig.from_hf(hf_dict(MistralConfig, num_key_value_heads=2, head_dim=24))
    assert cfg.head_dim == 24
    shapes = cfg.tensor_shapes()
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 24, 32)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 4 * 24)


def test_tied_embeddings_have_no_lm_head():
    cfg = ModelConfig.from_hf(hf_dict(Qwen2Config, tie_word_embeddings=True))
    assert cfg.tie_word_embeddings and "lm_head.weight" not in cfg.tensor_shapes()
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    assert untied.tensor_shapes()["lm_head.weight"] == (97, 32)


@pytest.mark.parametrize("layout", ["rope_parameters", "legacy"])
def test_llama3_rope_scaling(layout):
    if layout == "rope_parameters":  # what transformers 5 writes
        d = hf_dict(LlamaConfig, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0},
                    max_position_embeddings=131072)
        assert "rope_scaling" not in d and "rope_theta" not in d
    else:  # what Meta's config.json (transformers 4) says
        d = {**SMALL, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
             "rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 131072}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_ROPE
    assert cfg.max_position_embeddings == 131072


def test_rope_theta_in_both_layouts_and_old_type_key():
    assert ModelConfig.from_hf({**SMALL, "model_type": "llama", "rope_theta": 1e6}).rope_theta == 1e6
    d = {**SMALL, "model_type": "llama", "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}}
    d["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(d).rope_scaling["rope_type"] == "llama3"
    d = hf_dict(Qwen2Config, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None


def test_unsupported_rope_type_is_named():
    d = {**SMALL, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModel, match=r"rope scaling type 'yarn'.*llama3"):
        ModelConfig.from_hf(d)


def test_qwen2_biases_and_llama_attention_bias():
    q = ModelConfig.from_hf(hf_dict(Qwen2Config, num_key_value_heads=2))
    assert (q.architecture, q.qkv_bias, q.o_bias, q.mlp_bias) == ("qwen2", True, False, False)
    shapes = q.tensor_shapes()
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (16,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    ll = ModelConfig.from_hf(hf_dict(LlamaConfig, attention_bias=True, mlp_bias=True))
    assert (ll.qkv_bias, ll.o_bias, ll.mlp_bias) == (True, True, True)
    assert ll.tensor_shapes()["model.layers.1.mlp.down_proj.bias"] == (32,)


def test_sliding_windows_as_transformers_applies_them():
    assert ModelConfig.from_hf(hf_dict(MistralConfig)).sliding_window == 4096  # MistralConfig default
    assert ModelConfig.from_hf(hf_dict(MistralConfig, sliding_window=None)).sliding_window is None
    assert ModelConfig.from_hf({**SMALL, "num_attention_heads": 8, "model_type": "mistral"}).sliding_window == 4096
    assert ModelConfig.from_hf(hf_dict(Qwen2Config, sliding_window=128)).sliding_window is None  # not enabled
    on = hf_dict(Qwen2Config, use_sliding_window=True, sliding_window=128, max_window_layers=0)
    assert ModelConfig.from_hf(on).sliding_window == 128
    mixed = hf_dict(Qwen2Config, use_sliding_window=True, sliding_window=128, max_window_layers=1)
    with pytest.raises(UnsupportedModel, match="sliding window on 1 of 2 layers"):
        ModelConfig.from_hf(mixed)


def test_missing_kv_heads_follow_each_family_default():
    # a config.json without num_key_value_heads means what the family's class default says
    assert ModelConfig.from_hf({**SMALL, "model_type": "llama"}).num_kv_heads == 4
    d = {**SMALL, "num_attention_heads": 16, "hidden_size": 64}
    assert ModelConfig.from_hf({**d, "model_type": "mistral"}).num_kv_heads == 8
    assert ModelConfig.from_hf({**d, "model_type": "mistral", "num_key_value_heads": None}).num_kv_heads == 16


def test_dtype_and_eos_list():
    cfg = ModelConfig.from_hf({**hf_dict(LlamaConfig), "dtype": None, "torch_dtype": "bfloat16",
                               "eos_token_id": [128001, 128009]})
    assert cfg.dtype == "bfloat16" and cfg.eos_token_ids == (128001, 128009)
    assert ModelConfig.from_hf(hf_dict(LlamaConfig, dtype=torch.float16)).dtype == "float16"
    with pytest.raises(UnsupportedModel, match="float64"):
        ModelConfig.from_hf({**hf_dict(LlamaConfig), "dtype": "float64"})


@pytest.mark.parametrize("d, named", [
    ({**SMALL, "architectures": ["GPT2LMHeadModel"], "model_type": "llama"}, "GPT2LMHeadModel"),
    ({**SMALL, "architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({**SMALL, "model_type": "gpt2"}, "'gpt2'"),
])
def test_unknown_architecture_is_named_with_the_supported_ones(d, named):
    with pytest.raises(UnsupportedModel) as err:
        ModelConfig.from_hf(d)
    msg = str(err.value)
    assert named in msg
    assert all(a in msg for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))


def test_checks_give_clear_messages():
    good = ModelConfig.from_hf(hf_dict(LlamaConfig))
    with pytest.raises(ValueError, match=r"num_heads=4 is not a multiple of num_kv_heads=3"):
        dataclasses.replace(good, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"hidden_size=0 must be a positive integer"):
        dataclasses.replace(good, hidden_size=0)
    with pytest.raises(ValueError, match=r"lacks hidden_size"):
        ModelConfig.from_hf({k: v for k, v in hf_dict(LlamaConfig).items() if k != "hidden_size"})


def test_to_dict_round_trips():
    cfg = ModelConfig.from_hf(hf_dict(LlamaConfig, rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5},
                                      max_position_embeddings=131072))
    d = cfg.to_dict()
    assert d["rope_scaling"] == LLAMA3_ROPE and d["eos_token_ids"] == [2]
    assert ModelConfig.from_dict(d) == cfg


@pytest.mark.parametrize("name, layers, hidden, billions", [
    ("llama3-8b", 32, 4096, 8.03), ("llama3-70b", 80, 8192, 70.55), ("llama3.1-405b", 126, 16384, 405.85)])
def test_presets_have_the_published_shapes(name, layers, hidden, billions):
    cfg = get_model_preset(name)
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim) == \
        (layers, hidden, 128256, 8, 128)
    assert cfg.rope_theta == 500000.0 and cfg.dtype == "bfloat16" and not cfg.tie_word_embeddings
    params = sum(torch.Size(s).numel() for s in cfg.tensor_shapes().values())
    assert params / 1e9 == pytest.approx(billions, abs=0.01)  # Meta's model cards: 8B, 70B, 405B


def test_preset_rope_and_context():
    assert get_model_preset("llama3-8b").rope_scaling is None
    assert get_model_preset("llama3-8b").max_position_embeddings == 8192
    big = get_model_preset("llama3.1-405b")
    assert big.rope_scaling == LLAMA3_ROPE and big.max_position_embeddings == 131072


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*llama3-8b, llama3-70b, llama3.1-405b"):
        get_model_preset("gpt5")
    assert set(MODEL_PRESETS) == {"llama2-7b", "llama3-8b", "llama3-70b", "llama3.1-405b"}


@pytest.mark.parametrize("doc, named", [
    ([1, 2, 3], "must hold a JSON object, got a list"),
    ("llama", "must hold a JSON object, got a str"),
    ({**hf_dict(LlamaConfig), "num_hidden_layers": 10_000_000}, "num_layers=10000000 exceeds the limit"),
    ({**hf_dict(LlamaConfig), "num_hidden_layers": 1e7}, "num_layers=10000000.0 must be a positive integer"),
    ({**hf_dict(LlamaConfig), "vocab_size": 1 << 40}, "vocab_size=1099511627776 exceeds the limit"),
    ({**hf_dict(LlamaConfig), "hidden_size": "32"}, "hidden_size='32' must be a positive integer"),
    ({**hf_dict(LlamaConfig), "rms_norm_eps": [1e-6]}, "wrong type"),
    ({**hf_dict(LlamaConfig), "rope_parameters": {"rope_theta": "big"}}, "rope_theta='big' must be a number"),
    ({**hf_dict(LlamaConfig), "architectures": {"a": 1}}, "architectures must be a list"),
    ({**hf_dict(LlamaConfig), "architectures": None, "model_type": ["llama"]}, "unsupported architecture"),
    ({**hf_dict(LlamaConfig), "eos_token_id": ["x"]}, "eos_token_ids holds 'x'"),
])
def test_configs_of_the_wrong_type_or_size_are_refused_at_once(doc, named):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_hf(doc)
    assert time.perf_counter() - t0 < 0.5  # refused before anything is built


def test_limits_admit_every_preset():
    from rsd_runtime.model_config import LIMITS

    for cfg in MODEL_PRESETS.values():
        assert all(getattr(cfg, f) * 8 <= lim for f, lim in LIMITS.items())
