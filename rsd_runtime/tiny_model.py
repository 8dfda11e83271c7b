"""The built-in default checkpoint: a tiny random Llama, made on first use, the same bytes every time.

    path = ensure_tiny_model()          # ~/.cache/rsd-runtime/tiny-llama-v1 (or $RSD_CACHE_DIR/...)
    ckpt = load_checkpoint(path)

It is a real Hugging Face checkpoint (LlamaForCausalLM loads it) small enough to run everywhere:
4 layers, hidden 128, GQA with 8 heads over 4 kv heads, a byte-level BPE of 512 tokens trained on
the text below. The weights are random (fixed seed), so it babbles; it exists to check that a
sharded run gives the same numbers as an unsharded one, not to say anything.

Made with torch, safetensors and tokenizers only. Change anything that alters the bytes and the
folder name's version must change too, or old caches would be taken for the new model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rsd_runtime.model_config import ModelConfig

TINY_MODEL_NAME = "tiny-llama-v1"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SEED = 20240917
BOS, EOS = "<s>", "</s>"
VOCAB_SIZE = 512  # 256 byte tokens + 2 special + 254 merges
INIT_STD = 0.02  # LlamaConfig.initializer_range

# The tokenizer's training text. Byte-level BPE covers any input; this only decides which merges exist.
CORPUS = (
    "A computer is a machine that follows instructions. The processor reads a small instruction from "
    "memory, does what it says, and moves on to the next one, billions of times every second. Programs "
    "are long lists of such instructions, written by people in a language the computer can translate.",

    "Memory holds the numbers a program works on. Fast memory is small and close to the processor; "
    "large memory is slower and farther away. Much of the work of making a computer fast is keeping the "
    "right numbers in the fast memory at the right time, so that the processor never has to wait.",

    "When one computer is not enough, many computers work together. They send messages to each other "
    "over a network, and each one does a part of the work. A large model may be split over several "
    "cards, each holding a slice of the weights, and the cards add their partial results together.",

    "The weather changes from day to day. In the morning the sky was clear and the air was cold, about "
    "4 °C, with frost on the grass. By noon the wind turned to the west, clouds came in from the sea, "
    "and the temperature rose to 12 °C. In the evening it started to rain, and the rain fell all night.",

    "A weather forecast is made by a computer. It divides the air into small boxes, measures the "
    "temperature, the pressure and the wind in each box, and computes how they will change over the next "
    "hours and days. Tomorrow will be cloudy with some sun in the afternoon, and warmer than today.",

    "In summer the days are long and the nights are short. Storms build up on hot afternoons, with "
    "thunder, lightning and heavy rain, and then the sky is clear again. In winter the days are short, "
    "the sun is low, and snow may fall in the hills while the valleys stay grey and wet.",
)


def tiny_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """config.json of the tiny model, in the layout transformers 4 and 5 both read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def default_cache_dir() -> Path:
    return Path(os.environ.get("RSD_CACHE_DIR") or Path.home() / ".cache" / "rsd-runtime")


def ensure_tiny_model(cache_dir: Path | None = None, seed: int = SEED) -> Path:
    """The tiny checkpoint's folder under cache_dir, built there first if absent. Another ``seed``
    gives a variant with other weights (the same shape and tokenizer), in a folder of its own.

    Built in a private temp folder and renamed into place: rename is atomic, so a concurrent first
    use either wins the rename or finds the other's complete folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = TINY_MODEL_NAME if seed == SEED else f"{TINY_MODEL_NAME}-seed{seed}"
    final = root / name
    if final.exists():
        _check_complete(final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build_tiny_model(tmp, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            _check_complete(final)  # another process built it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(out_dir: Path, seed: int = SEED) -> None:
    """Write the tiny checkpoint's files into out_dir (which must exist)."""
    out_dir = Path(out_dir)
    tok = train_tokenizer()
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    hf_config = tiny_config(tok.get_vocab_size(), bos_id, eos_id)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8", newline="\n")
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": hf_config["max_position_embeddings"], "clean_up_tokenization_spaces": False})
    _write_json(out_dir / "config.json", hf_config)
    save_file(random_weights(ModelConfig.from_hf(hf_config), seed), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE on CORPUS; <s> and </s> are ids 0 and 1.

    The trainer is deterministic: pairs are counted exactly and ties broken by token id, and ids
    of the byte alphabet are assigned in byte order, so the same corpus gives the same merges
    (checked by tests/rsd_runtime/test_tiny_model.py).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # As Llama 3's tokenizer.json does, so that transformers' tokenizer adds bos by itself.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def random_weights(config: ModelConfig, seed: int = SEED) -> dict[str, torch.Tensor]:
    """N(0, 0.02) for matrices as HF's init does, ones for the RMSNorm weights; one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in config.tensor_shapes().items():  # a fixed order: the generator's draws follow it
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.randn(shape, generator=gen) * INIT_STD
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")


def _check_complete(folder: Path) -> None:
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} exists but lacks {', '.join(missing)}; delete the folder and it will be "
                                f"rebuilt on next use")
