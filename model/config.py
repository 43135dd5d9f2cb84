"""Model configuration: typed dataclass, named presets, and the official Emu3.5 `config.json` mapping.

SPEC §1 gives the architecture and the 34B sizes; SPEC §2 gives the vocabulary layout, which every
config carries as (`num_text_tokens`, `codebook_size`): text ids first, then the 211 special tokens
of the release, then one id per visual code. The official layout is 151,643 + 211 + 131,072 =
282,926 ids; our small models keep the same structure with a small text vocabulary and codebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# <|endoftext|>, <|im_start|>, <|im_end|>, 205 <|extra_i|>, <|image token|>, <|image start|>, <|image end|>
NUM_SPECIAL_TOKENS = 3 + 205 + 3


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the decoder. `vocab_size` may exceed the layout's id count (padded embeddings);
    padded ids are never sampled."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_text_tokens: int
    codebook_size: int
    vocab_size: int = 0  # 0: exactly the layout's id count
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.1  # attention-probability dropout, training only (official `attention_dropout`)
    dida_steps: int = 0  # > 0: adapted by DiDA (SPEC §5); images decode in this many parallel steps by default

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings", "num_text_tokens", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if self.vocab_size == 0:
            object.__setattr__(self, "vocab_size", self.layout_size)
        if self.vocab_size < self.layout_size:
            raise ValueError(f"vocab_size: must be >= {self.layout_size} (num_text_tokens + "
                             f"{NUM_SPECIAL_TOKENS} special + codebook_size), got {self.vocab_size}")
        if not (self.rope_theta > 0):
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta}")
        if not isinstance(self.dida_steps, int) or isinstance(self.dida_steps, bool) or self.dida_steps < 0:
            raise ValueError(f"dida_steps: must be an integer >= 0 (0: not DiDA-adapted), got {self.dida_steps!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    @property
    def layout_size(self) -> int:
        return self.num_text_tokens + NUM_SPECIAL_TOKENS + self.codebook_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}; allowed: {sorted(fields)}")
        missing = [n for n, f in fields.items() if n not in d
                   and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"config: missing required field(s) {missing}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # a forward pass in well under a second on a CPU; head_dim*heads != hidden and GQA on purpose
    "debug": ModelConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=32, max_position_embeddings=2048, num_text_tokens=512, codebook_size=256),
    # the embedded default world model (trained on CPU by train/)
    "demo": ModelConfig(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2,
                        head_dim=64, max_position_embeddings=4096, num_text_tokens=4096, codebook_size=2048),
    # BAAI/Emu3.5 and Emu3.5-Image (SPEC §1)
    "emu3.5-34b": ModelConfig(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                              num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                              num_text_tokens=151643, codebook_size=131072),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


# ---- official (Hub) config.json -------------------------------------------------------------------

OFFICIAL_MODEL_TYPE = "Emu3"
_OFFICIAL_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings")


def from_official_config(cfg: dict, *, num_text_tokens: int, codebook_size: int,
                         checkpoint_head_dim: int | None = None) -> ModelConfig:
    """Map an official `config.json` to a ModelConfig. The vocabulary layout comes from the
    tokenizer files (see text_tokenizer.py), not from this dict.

    `head_dim` is explicit in Emu3.5 (SPEC §1: the 34B model has 64 heads x 128 = 8192 != 5120
    hidden), so when config.json lacks it (or has null) hidden/heads would be wrong. The caller then
    passes `checkpoint_head_dim`, the length of the checkpoint's per-head
    `model.layers.0.self_attn.q_norm.weight` (checkpoint.read_config reads it from the safetensors
    header); only when that is None too does it fall back to hidden/heads as transformers does, and
    a mismatch with the stored q_proj shape is then a ValueError at load. `rope_theta` is read from
    the top level or from transformers-5 style `rope_parameters`; it has no default because the
    released value is not verified here (SPEC §1)."""
    if cfg.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"config.json: model_type must be {OFFICIAL_MODEL_TYPE!r} for the official "
                         f"layout (or 'worldsim' for ours), got {cfg.get('model_type')!r}")
    missing = [k for k in _OFFICIAL_REQUIRED if k not in cfg]
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta"))
    if rope_theta is None:
        missing.append("rope_theta")
    if missing:
        raise ValueError(f"config.json: missing required field(s) {missing}")
    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope_params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope scaling type {rope_type!r} is not supported; allowed: 'default'")
    if cfg.get("tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings must be false (Emu3.5 has an untied lm_head)")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        head_dim = checkpoint_head_dim
    if head_dim is None:
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return ModelConfig(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=head_dim,
        max_position_embeddings=cfg["max_position_embeddings"], num_text_tokens=num_text_tokens,
        codebook_size=codebook_size, vocab_size=cfg["vocab_size"], rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), dropout=float(cfg.get("attention_dropout", 0.1)))


def to_official_config(config: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict:
    """The official `config.json` for these sizes (what `save_pretrained(layout="official")` writes)."""
    return {
        "architectures": ["Emu3ForCausalLM"], "model_type": OFFICIAL_MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "attention_dropout": config.dropout, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "torch_dtype": torch_dtype,
    }
