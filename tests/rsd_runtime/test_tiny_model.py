"""The built-in tiny checkpoint: reproducible bytes, loadable by transformers and by us; its tokenizer."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from rsd_runtime import tiny_model
from rsd_runtime.checkpoint import load_checkpoint
from rsd_runtime.tiny_model import FILES, TINY_MODEL_NAME, ensure_tiny_model
from rsd_runtime.tokenizer import IncrementalDecoder, Tokenizer

SENTENCE = "Tomorrow the weather will be cloudy, about 12 °C, and the computer forecast says rain."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_built_twice_gives_identical_bytes(tiny, tmp_path):
    again = ensure_tiny_model(tmp_path)
    assert again == tmp_path / TINY_MODEL_NAME and again != tiny
    assert sorted(digests(tiny)) == sorted(FILES)
    assert digests(again) == digests(tiny)


def test_second_use_reuses_the_folder(tmp_path, monkeypatch):
    first = ensure_tiny_model(tmp_path)
    monkeypatch.setattr(tiny_model, "build_tiny_model", lambda out: pytest.fail("rebuilt an existing model"))
    assert ensure_tiny_model(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_NAME]  # no temp folder left


def test_losing_the_race_to_another_builder_is_fine(tmp_path, monkeypatch):
    build = tiny_model.build_tiny_model
    rounds = []

    def build_while_another_finishes_first(out, *args):
        build(out, *args)
        if not rounds:  # the competitor builds and renames into place between our build and rename
            rounds.append(out)
            ensure_tiny_model(tmp_path)

    monkeypatch.setattr(tiny_model, "build_tiny_model", build_while_another_finishes_first)
    path = ensure_tiny_model(tmp_path)
    assert path == tmp_path / TINY_MODEL_NAME and sorted(digests(path)) == sorted(FILES)
    assert not rounds[0].exists() and [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_NAME]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RSD_CACHE_DIR", str(tmp_path / "envcache"))
    assert ensure_tiny_model() == tmp_path / "envcache" / TINY_MODEL_NAME


def test_incomplete_folder_is_reported(tmp_path):
    (tmp_path / TINY_MODEL_NAME).mkdir()
    (tmp_path / TINY_MODEL_NAME / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, tokenizer.json.*delete the folder"):
        ensure_tiny_model(tmp_path)


def test_shape_and_size(tiny):
    ckpt = load_checkpoint(tiny, progress=False)
    c = ckpt.config
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 128, 4, 8, 4, 16)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.rope_theta) == (352, 512, 1024, 1e4)
    assert c.dtype == "float32" and not c.tie_word_embeddings and "lm_head.weight" in ckpt.names()
    assert (tiny / "model.safetensors").stat().st_size < 4 << 20
    norms = [n for n in ckpt.names() if n.endswith("norm.weight")]
    assert all(torch.equal(ckpt.get(n), torch.ones(128)) for n in norms)
    embed = ckpt.get("model.embed_tokens.weight")
    assert embed.std().item() == pytest.approx(0.02, rel=0.05)


def test_transformers_loads_and_runs_it(tiny):
    model = LlamaForCausalLM.from_pretrained(tiny)
    assert model.config.num_key_value_heads == 4 and model.config.rope_parameters["rope_theta"] == 1e4
    ckpt = load_checkpoint(tiny, progress=False)
    state = model.state_dict()
    assert all(torch.equal(state[n], ckpt.get(n)) for n in ckpt.names())
    ids = Tokenizer.from_file(tiny / "tokenizer.json").encode(SENTENCE)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_tokenizer_round_trips(tiny):
    tok = Tokenizer.from_file(tiny / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 512)
    ids = tok.encode(SENTENCE)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert len(ids) < len(SENTENCE) / 2  # merges learned from the embedded text are used
    assert tok.decode(ids) == SENTENCE
    assert tok.encode(SENTENCE, add_bos=False) == ids[1:]
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False) == "<s>" + SENTENCE + "</s>"


def test_transformers_tokenizer_agrees(tiny):
    hf = AutoTokenizer.from_pretrained(tiny)
    tok = Tokenizer.from_file(tiny)
    assert hf(SENTENCE).input_ids == tok.encode(SENTENCE)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)


def test_incremental_decoder_holds_back_partial_characters(tiny):
    tok = Tokenizer.from_file(tiny)
    text = "Sun ☀ and snow ❄ at 3 °C."  # the symbols are not in the training text: one token per byte
    ids = tok.encode(text, add_bos=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(t) for t in ids]
    assert "".join(pieces) == dec.text == text
    assert "\ufffd" not in "".join(pieces)
    sun = pieces.index("☀")
    assert pieces[sun - 2:sun] == ["", ""]  # its first two bytes gave nothing yet
    assert dec.feed(tok.eos_id) == "" and dec.text == text
