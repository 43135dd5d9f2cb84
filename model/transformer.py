"""The Emu3.5 decoder (SPEC §1): a Llama/Qwen3-style transformer with QK-norm, GQA and an explicit
head_dim. Architecture only: masks and the attention kernel live in attention.py, the cache in
kv_cache.py, sampling in sampling.py.

Legend: B batch, T new tokens, S keys (cached + new), C hidden_size, H query heads, K kv heads,
D head_dim, F intermediate_size, V vocab_size.

State-dict keys are those of the official checkpoints (`model.embed_tokens.weight`,
`model.layers.N.self_attn.q_norm.weight`, ..., `lm_head.weight`), so no renaming happens at load.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import CAUSAL, FULL, attend, causal_with_offset, padded_causal
from model.config import ModelConfig
from model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Normalised in fp32, cast back to the input dtype, then scaled (the release's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, D), fp32, NeoX "rotate half" layout (two repeated halves)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        # QK-norm, per head, before rotary; applied here so that every kernel path gets it
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, K, S, D)
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`forward(input_ids) -> logits`; see forward for the cache, positions and masks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vocab = None  # model.vocab.Vocab, attached by the loader together with `tokenizer`
        self.tokenizer = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def new_cache(self, batch_size: int = 1, max_length: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch_size` rows; None (not 0, which KVCache refuses) means the full
        context, the model's device and its dtype."""
        w = self.lm_head.weight
        return KVCache(self.config, batch_size,
                       self.config.max_position_embeddings if max_length is None else max_length,
                       device=w.device if device is None else device, dtype=w.dtype if dtype is None else dtype)

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask=None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, score: torch.Tensor | None = None,
                vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """input_ids (B, T) long -> logits (B, T, V) (or (B, 1, V) with last_only).

        cache: new tokens are appended to it and attend to everything cached.
        attention_mask: (B, T) bool, False for left padding; positions then count real tokens only.
        mask: None for causal attention, `attention.FULL`, a dense bool (B|1, 1, T, S) tensor or a
            FlexAttention BlockMask; an explicit mask replaces the causal/padding mask.
        positions: (B, T) long rotary positions; by default they continue the cache's positions.
        score: (T',) long indices along T: logits only for those positions, (B, T', V).
        vocab_range: (lo, hi): logits only for ids lo..hi-1, (..., hi - lo); the head multiplies by
            those rows of lm_head.weight alone (a sampler that may only pick visual codes skips the rest),
            so lm_head's forward (and any hook on it) is not called then.
        """
        if last_only and score is not None:
            raise ValueError("score: give either last_only or score, not both")
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(T)
        if positions is None:
            base = cache.next_position[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long,
                                                                                        device=input_ids.device)
            steps = (attention_mask.long().cumsum(1) - 1).clamp(min=0) if attention_mask is not None else \
                torch.arange(T, device=input_ids.device)[None]
            positions = base + steps  # (B, T)
        if mask is None:
            mask = self._default_mask(B, T, start, cache, attention_mask, input_ids.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T, attention_mask)
        if last_only:
            x = x[:, -1:]
        elif score is not None:
            x = x[:, score]
        x = self.model.norm(x)
        if vocab_range is None:
            return self.lm_head(x)  # (B, T, V)
        lo, hi = vocab_range
        return F.linear(x, self.lm_head.weight[lo:hi])  # (B, T, hi - lo)

    @staticmethod
    def _default_mask(B, T, start, cache, attention_mask, device):
        """Causal over cached + new keys; hides padding when any row was padded. Built once per forward."""
        padded = attention_mask is not None or (cache is not None and cache.key_valid is not None)
        if not padded:
            if start == 0:
                return CAUSAL
            return FULL if T == 1 else causal_with_offset(T, start + T, device)
        valid = torch.ones(B, start + T, dtype=torch.bool, device=device)
        if cache is not None and cache.key_valid is not None:
            valid[:, :start] = cache.key_valid[:, :start]
        if attention_mask is not None:
            valid[:, start:] = attention_mask
        return padded_causal(valid, T)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, in the transformer layers, and in the two embedding matrices."""
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        return {"total": count(self), "layers": count(self.model.layers),
                "embeddings": count(self.model.embed_tokens) + count(self.lm_head)}
