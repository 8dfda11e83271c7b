"""Tensor-parallel inference across real card processes against transformers as the reference."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rsd_runtime.llm import LLM  # noqa: E402
from rsd_runtime.sampling import SamplingParams  # noqa: E402

PROMPTS = [[5, 17, 42, 7, 99, 3, 11], [8, 1, 250], [33, 2, 71, 64, 12, 9, 4, 18, 27, 31, 6, 15, 88, 40]]


def _llama(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base), transformers.LlamaForCausalLM


def _qwen2(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    base.update(kw)
    return transformers.Qwen2Config(**base), transformers.Qwen2ForCausalLM


def _mistral(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    base.update(kw)
    return transformers.MistralConfig(**base), transformers.MistralForCausalLM


SHAPES = {
    # multi-head attention, every split even
    "llama-mha": lambda: _llama(),
    # GQA with 2 kv heads: tp 4 replicates them; a vocabulary that 2 and 4 do not divide
    "llama-gqa-odd-vocab": lambda: _llama(num_attention_heads=8, num_key_value_heads=2, vocab_size=261,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}),
    # biases on q/k/v, tied embeddings
    "qwen2-bias-tied": lambda: _qwen2(),
    "mistral": lambda: _mistral(),
}


def save_model(tmp_path_factory, key: str, *, dtype=torch.float32, max_shard_size=None):
    cfg, cls = SHAPES[key]()
    torch.manual_seed(1234)
    model = cls(cfg).to(dtype).eval()
    path = tmp_path_factory.mktemp(key)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path, model.float().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {key: save_model(tmp_path_factory, key) for key in SHAPES}
    out["llama-bf16-sharded"] = save_model(tmp_path_factory, "llama-mha", dtype=torch.bfloat16,
                                           max_shard_size="50KB")
    return out


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


CASES = [(key, tp) for key in [*SHAPES, "llama-bf16-sharded"] for tp in (1, 2, 4)]


@pytest.mark.parametrize("key,tp", CASES, ids=[f"{k}-tp{t}" for k, t in CASES])
def test_logits_and_greedy_generation_match_transformers(models, key, tp, shm_prefix):
    path, ref = models[key]
    dtype = "float32"  # bf16 weights are computed in float32 on both sides
    with LLM(model=str(path), tensor_parallel_size=tp, dtype=dtype, shm_prefix=shm_prefix, progress=False) as llm:
        for prompt in PROMPTS:
            ours = llm.engine.prefill_logits(prompt)
            with torch.no_grad():
                theirs = ref(torch.tensor([prompt])).logits[0]
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.token_ids) == 32 and out.finish_reason == "length"
        assert out.token_ids == reference_greedy(ref, prompt, 32)
        m = out.metrics
        assert m["ttft_s"] > 0 and m["emu_ttft_s"] > 0 and m["emu_tpot_s"] > 0


def test_kv_cache_is_in_shared_memory_and_holds_the_reference_keys(models, shm_prefix):
    """Read a card's KV cache segment from this (outside) process and compare with transformers' cache."""
    import numpy as np

    from devices.shm import Segment

    path, ref = models["llama-mha"]
    prompt = PROMPTS[2]
    with LLM(model=str(path), tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        eng = llm.engine
        eng.prefill_logits(prompt)  # the first allocation takes blocks 0, 1, ... in order
        with torch.no_grad():
            cache = ref(torch.tensor([prompt]), use_cache=True).past_key_values
        keys_ref = cache.layers[1].keys[0]  # (kv heads, T, head_dim), after RoPE
        vals_ref = cache.layers[1].values[0]
        cfg, T, bs = eng.cfg, len(prompt), eng.block_size
        kvh = cfg.num_kv_heads // 2
        for card in range(2):
            reply = eng.cluster.status()[card]
            assert reply["kv_blocks"] == eng.num_kv_blocks
            seg = Segment(f"{eng.cluster.run_name}_c{card:03d}_kv")
            shape = (cfg.num_layers, 2, eng.num_kv_blocks, bs, kvh, cfg.head_dim)
            kv = np.frombuffer(seg.buf, np.float32, int(np.prod(shape))).reshape(shape)
            nb = -(-T // bs)
            for which, want in ((0, keys_ref), (1, vals_ref)):
                got = torch.from_numpy(kv[1, which, :nb].reshape(nb * bs, kvh, cfg.head_dim)[:T].copy())
                torch.testing.assert_close(got.transpose(0, 1), want[card * kvh:(card + 1) * kvh], rtol=0,
                                           atol=1e-5)
            del kv
            seg.close()


def test_bad_prompts_are_refused_and_the_engine_lives_on(models, shm_prefix):
    path, _ = models["llama-mha"]
    with LLM(model=str(path), tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        with pytest.raises(ValueError, match="prompt is empty"):
            llm.generate([[]])
        with pytest.raises(ValueError, match="context is 256 tokens"):
            llm.generate([[1] * 300])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[1, 2, 9999]])
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(out[0].token_ids) == 3


def test_impossible_split_is_refused_before_any_card_starts(models, shm_prefix):
    from rsd_runtime.compiler import SplitError

    path, _ = models["qwen2-bias-tied"]  # 8 heads, 2 kv heads, intermediate 128
    with pytest.raises(SplitError, match=r"tp=3: num_heads=8 is not divisible by tp=3.*work: 1, 2, 4, 8"):
        LLM(model=str(path), tensor_parallel_size=3, shm_prefix=shm_prefix, progress=False)
    with pytest.raises(SplitError, match="tp=16 exceeds num_heads=8"):
        LLM(model=str(path), tensor_parallel_size=16, shm_prefix=shm_prefix, progress=False)


@pytest.mark.parametrize("breakage,message", [
    ("missing", "model.layers.1.mlp.up_proj.weight"),
    ("shape", "config contradicts weights"),
    ("arch", "GPTNeoXForCausalLM"),
])
def test_broken_checkpoints_are_refused_before_any_card_starts(models, tmp_path, shm_prefix, breakage, message):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from rsd_runtime.checkpoint import CheckpointError

    src, _ = models["llama-mha"]
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    if breakage == "missing":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif breakage == "shape":
        cfg["hidden_size"] = 32
    else:
        cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        LLM(model=str(dst), tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False)


def test_sampling_with_a_seed_repeats_and_stop_strings_cut(shm_prefix):
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:  # the built-in tiny model
        params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
        a = llm.generate(["The weather"], params)[0]
        b = llm.generate(["The weather", "Computers"], [params, SamplingParams(max_tokens=5, seed=1)])[0]
        assert a.token_ids == b.token_ids and len(a.token_ids) == 12
        greedy = llm.generate(["The weather"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        stop = greedy.text[3:5]
        cut = llm.generate(["The weather"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           stop=[stop]))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and greedy.text.startswith(cut.text)
        streamed = []
        llm.generate(["The weather"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                     on_token=lambda i, tok, text: streamed.append(tok))
        assert streamed == greedy.token_ids[:6]
