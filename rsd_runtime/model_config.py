"""ModelConfig: the shape of a decoder-only transformer, read from a Hugging Face config.json.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))
    cfg.tensor_shapes()["model.layers.0.self_attn.k_proj.weight"]   # (num_kv_heads * head_dim, hidden_size)
    get_model_preset("llama3-70b")                                   # a published shape, no weights

Three families share one tensor layout (Llama's): Llama, Mistral and Qwen2.
They differ only in biases, sliding windows and defaults. The defaults below
are those of LlamaConfig, MistralConfig and Qwen2Config in transformers 5.23,
so a config.json that leaves a key out means what it means to transformers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class UnsupportedModel(ValueError):
    """The config describes a model this runtime cannot run (architecture, rope type, attention pattern)."""


# HF architecture class -> our family name; model_type is the fallback when "architectures" is absent.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
DTYPES = ("float32", "bfloat16", "float16")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DEFAULT_ROPE_THETA = 10_000.0  # RotaryEmbeddingConfigMixin.default_theta

# Keys a config.json may leave out, and what each family's transformers config then uses.
# A missing num_key_value_heads is num_attention_heads for Llama, but 8 for Mistral and 32 for Qwen2
# (the class defaults); an explicit null is num_attention_heads for all three.
_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, num_key_value_heads=None),
    "mistral": dict(max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2, num_key_value_heads=8,
                    sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, num_key_value_heads=32,
                  sliding_window=4096, max_window_layers=28),
}
# Upper bounds on a config's sizes, checked before anything is allocated: each is 8x or more the largest
# dense model of MODEL_PRESETS (Llama 3.1 405B: vocab 128256, hidden 16384, ffn 53248, 126 layers,
# 128 heads, head_dim 128, 131072 positions; meta-llama/Llama-3.1-405B config.json), so that no real
# model is refused and a typo (num_hidden_layers=1e7) is refused at once instead of eating memory.
LIMITS = {"vocab_size": 1 << 21, "hidden_size": 1 << 17, "intermediate_size": 1 << 19, "num_layers": 1024,
          "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 24}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Per-layer tensors: suffix -> the config quantity behind each dimension (see ModelConfig.dim).
_ATTN = {"q": ("q_size", "hidden_size"), "k": ("kv_size", "hidden_size"), "v": ("kv_size", "hidden_size")}
_MLP = {"gate": ("intermediate_size", "hidden_size"), "up": ("intermediate_size", "hidden_size"),
        "down": ("hidden_size", "intermediate_size")}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # config head_dim if given, else hidden_size // num_heads
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or {"rope_type": "llama3", factor, low/high_freq_factor, original_max_...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # attention window of every layer, None for full attention
    dtype: str  # the dtype config.json declares; a checkpoint's tensors report their own
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self):
        name = f"{self.architecture} config"
        if self.architecture not in ARCHITECTURES.values():
            raise UnsupportedModel(f"unsupported architecture {self.architecture!r}; "
                                   f"supported: {', '.join(ARCHITECTURES.values())}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: {f}={v!r} must be a positive integer")
            if v > LIMITS[f]:
                raise ValueError(f"{name}: {f}={v} exceeds the limit of {LIMITS[f]} (see model_config.LIMITS)")
        for f in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{name}: {f}={v!r} must be a number")
        for f in ("bos_token_id", *(("eos_token_ids",) if isinstance(self.eos_token_ids, tuple) else ())):
            ids = getattr(self, f)
            for t in ids if isinstance(ids, tuple) else (ids,):
                if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
                    raise ValueError(f"{name}: {f} holds {t!r}, which is not a token id")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}; each kv head must serve a whole group of heads")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{name}: rms_norm_eps={self.rms_norm_eps} must be positive")
        if not self.rope_theta > 0:
            raise ValueError(f"{name}: rope_theta={self.rope_theta} must be positive")
        if self.rope_scaling is not None:
            _check_llama3(self.rope_scaling, name)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"{name}: sliding_window={self.sliding_window!r} must be a positive integer or None")
        if self.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {self.dtype!r} is not supported; supported: {', '.join(DTYPES)}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"{name}: eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def dim(self, quantity: str) -> int:
        """The size named by a tensor_dims() entry: a field, or q_size / kv_size."""
        return getattr(self, quantity)

    def tensor_dims(self) -> dict[str, tuple[str, ...]]:
        """Every tensor name -> the config quantity behind each of its dimensions, in HF order."""
        dims = {"model.embed_tokens.weight": ("vocab_size", "hidden_size")}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            dims[p + "input_layernorm.weight"] = ("hidden_size",)
            for proj, shape in _ATTN.items():
                dims[p + f"self_attn.{proj}_proj.weight"] = shape
                if self.qkv_bias:
                    dims[p + f"self_attn.{proj}_proj.bias"] = shape[:1]
            dims[p + "self_attn.o_proj.weight"] = ("hidden_size", "q_size")
            if self.o_bias:
                dims[p + "self_attn.o_proj.bias"] = ("hidden_size",)
            dims[p + "post_attention_layernorm.weight"] = ("hidden_size",)
            for proj, shape in _MLP.items():
                dims[p + f"mlp.{proj}_proj.weight"] = shape
                if self.mlp_bias:
                    dims[p + f"mlp.{proj}_proj.bias"] = shape[:1]
        dims["model.norm.weight"] = ("hidden_size",)
        if not self.tie_word_embeddings:
            dims["lm_head.weight"] = ("vocab_size", "hidden_size")
        return dims

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name this config expects -> its shape (torch Linear layout: [out, in])."""
        return {name: tuple(self.dim(q) for q in dims) for name, dims in self.tensor_dims().items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict (e.g. a resolved config written next to a run's results)."""
        return cls(**{**d, "eos_token_ids": tuple(d["eos_token_ids"])})

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a config.json dict; raises UnsupportedModel for what this runtime cannot run."""
        if not isinstance(cfg, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(cfg).__name__}")
        try:
            return cls._from_hf(cfg)
        except TypeError as exc:  # a field of the wrong JSON type met arithmetic or a lookup
            raise ValueError(f"config.json holds a field of the wrong type: {exc}") from None

    @classmethod
    def _from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = _family(cfg)
        missing = [k for k in _REQUIRED if cfg.get(k) is None]
        if missing:
            raise ValueError(f"{arch} config.json lacks {', '.join(missing)}")
        defaults = _FAMILY_DEFAULTS[arch]
        num_heads = cfg["num_attention_heads"]
        num_kv_heads = cfg.get("num_key_value_heads", defaults["num_key_value_heads"]) or num_heads
        # Llama and Mistral: config.head_dim or the quotient; Qwen2 reads it the same way through getattr.
        head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // num_heads if num_heads else 0)
        rope_theta, rope_scaling = _rope(cfg, arch)
        attention_bias = bool(cfg.get("attention_bias", False)) if arch == "llama" else False
        eos = cfg.get("eos_token_id", defaults["eos_token_id"])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=attention_bias,  # Qwen2's o_proj never has one
            mlp_bias=bool(cfg.get("mlp_bias", False)) if arch == "llama" else False,
            sliding_window=_sliding_window(cfg, arch),
            dtype=_dtype(cfg),
            bos_token_id=cfg.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)),
        )


def _family(cfg: dict) -> str:
    supported = f"supported: {', '.join(ARCHITECTURES)} (model_type {', '.join(ARCHITECTURES.values())})"
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"config.json: architectures must be a list of class names, got {archs!r:.80}")
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise UnsupportedModel(f"unsupported architecture {archs[0]!r}; {supported}")
        return ARCHITECTURES[archs[0]]
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES.values():
        raise UnsupportedModel(f"unsupported architecture (model_type {model_type!r}, no architectures); {supported}")
    return model_type


def _rope(cfg: dict, arch: str) -> tuple[float, dict | None]:
    """rope_theta and llama3 scaling from either layout.

    transformers 4 wrote top-level rope_theta plus rope_scaling (older files say "type" for
    "rope_type"); transformers 5 writes rope_parameters with rope_theta inside. As in
    RotaryEmbeddingConfigMixin, rope_scaling wins over rope_parameters and a theta inside the
    dict wins over the top-level one.
    """
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", _DEFAULT_ROPE_THETA))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ValueError(f"{arch} config: rope_theta={theta!r} must be a number")
    theta = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModel(f"{arch} config: rope scaling type {rope_type!r} is not supported; "
                               f"supported: default (none), llama3")
    missing = [k for k in _LLAMA3_KEYS[:3] if rope.get(k) is None]
    if missing:
        raise ValueError(f"{arch} config: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {"rope_type": "llama3", "factor": float(rope["factor"]),
               "low_freq_factor": float(rope["low_freq_factor"]), "high_freq_factor": float(rope["high_freq_factor"]),
               # transformers defaults it to max_position_embeddings (standardize_rope_params)
               "original_max_position_embeddings": int(rope.get("original_max_position_embeddings")
                                                       or cfg.get("max_position_embeddings", 2048))}
    return theta, scaling


def _check_llama3(scaling: dict, name: str) -> None:
    if scaling.get("rope_type") != "llama3" or any(k not in scaling for k in _LLAMA3_KEYS):
        raise ValueError(f"{name}: rope_scaling must be None or a llama3 dict with rope_type and "
                         f"{', '.join(_LLAMA3_KEYS)}; got {scaling!r}")
    if scaling["factor"] < 1 or scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{name}: llama3 rope scaling needs factor >= 1 and high_freq_factor > low_freq_factor; "
                         f"got {scaling!r}")


def _sliding_window(cfg: dict, arch: str) -> int | None:
    if arch == "llama":
        return None
    window = cfg.get("sliding_window", _FAMILY_DEFAULTS[arch]["sliding_window"])
    if arch == "mistral" or window is None:
        return window  # MistralAttention applies it to every layer
    if not cfg.get("use_sliding_window", False):
        return None  # Qwen2Config drops the window unless use_sliding_window
    # Qwen2 slides only on layers >= max_window_layers (or as layer_types says).
    num_layers = cfg["num_hidden_layers"]
    start = cfg.get("max_window_layers", _FAMILY_DEFAULTS["qwen2"]["max_window_layers"])
    types = cfg.get("layer_types") or ["sliding_attention" if i >= start else "full_attention"
                                       for i in range(num_layers)]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding == len(types):
        return window
    raise UnsupportedModel(f"qwen2 config: a sliding window on {sliding} of {len(types)} layers "
                           f"(use_sliding_window with max_window_layers={start}) is not supported; "
                           f"only all or none")


def _dtype(cfg: dict) -> str:
    raw = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"  # transformers 5 prefers "dtype"
    name = str(raw).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedModel(f"config.json dtype {raw!r} is not supported; supported: {', '.join(DTYPES)}")
    return name


def _llama3(hidden: int, intermediate: int, layers: int, heads: int, max_pos: int,
            rope_scaling: dict | None) -> ModelConfig:
    """The fields the Llama 3 and 3.1 configs share: vocab 128256, 8 kv heads, head_dim 128, theta 500000."""
    return ModelConfig(architecture="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=hidden // heads,
                       rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling,
                       max_position_embeddings=max_pos, tie_word_embeddings=False, qkv_bias=False, o_bias=False,
                       mlp_bias=False, sliding_window=None, dtype="bfloat16", bos_token_id=128000,
                       eos_token_ids=(128001,))


# Llama 3.1 rope scaling, from meta-llama/Llama-3.1-405B config.json ("rope_scaling").
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

MODEL_PRESETS: dict[str, ModelConfig] = {
    # meta-llama/Llama-2-7b-hf config.json: vocab 32000, hidden 4096, ffn 11008, 32 layers, 32 heads (no GQA),
    # rope theta 10000, 4096 positions, float16; the experts of SambaNova's Samba-CoE are 7B Llama 2 models
    "llama2-7b": ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                             rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
                             tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                             sliding_window=None, dtype="float16", bos_token_id=1, eos_token_ids=(2,)),
    # meta-llama/Meta-Llama-3-8B config.json (Hugging Face hub)
    "llama3-8b": _llama3(4096, 14336, 32, 32, 8192, None),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama3-70b": _llama3(8192, 28672, 80, 64, 8192, None),
    # meta-llama/Llama-3.1-405B config.json (base model; the Instruct one lists eos 128001, 128008, 128009)
    "llama3.1-405b": _llama3(16384, 53248, 126, 128, 131072, _LLAMA31_ROPE),
}


def get_model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}") from None
