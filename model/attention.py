"""Attention masks and the attention kernel dispatch (SPEC §1, §5).

Masks are built once per forward, outside the layers, and passed down as one of:
- `CAUSAL`: plain causal attention over the whole (cached + new) key range -> SDPA `is_causal`;
- `FULL`: every query sees every key (one-token decoding, DiDA's parallel image refinement);
- a bool tensor (B|1, 1, T, S), True = attend -> SDPA with `attn_mask` (the dense path);
- a FlexAttention `BlockMask` -> `flex_attention` (structured masks at training lengths).

A structured mask is written once as a `mask_mod(b, h, q_idx, kv_idx) -> bool` function and turned
into either a BlockMask or a dense tensor, so the two paths agree by construction of their inputs and
the tests check that the kernels agree too.

Legend: B batch, H query heads, K kv heads, T new tokens (queries), S keys (cached + new), D head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CAUSAL = "causal"
FULL = "full"


def causal_with_offset(T: int, S: int, device=None) -> torch.Tensor:
    """(1, 1, T, S) bool: new query i (absolute position S-T+i) sees keys 0..S-T+i."""
    q = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k = torch.arange(S, device=device)[None, :]  # (1, S)
    return (k <= q)[None, None]


def padded_causal(key_valid: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) bool: causal with offset, and padded keys hidden. key_valid: (B, S) bool.
    A padded query row still sees itself, so softmax never meets an all-masked row."""
    B, S = key_valid.shape
    mask = causal_with_offset(T, S, key_valid.device) & key_valid[:, None, None, :]  # (B, 1, T, S)
    eye = torch.arange(S - T, S, device=key_valid.device)[:, None] == torch.arange(S, device=key_valid.device)
    return mask | eye[None, None]


def document_mask_mod(doc_ids: torch.Tensor, block_ids: torch.Tensor | None = None):
    """mask_mod for packed sequences: causal inside each document (doc_ids: (B, T) long); tokens
    that share a nonzero block id also see each other bidirectionally (DiDA's noisy image blocks)."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        visible = kv_idx <= q_idx
        if block_ids is not None:
            qb = block_ids[b, q_idx]
            visible = visible | ((qb > 0) & (qb == block_ids[b, kv_idx]))
        return same_doc & visible

    return mask_mod


def dense_from_mask_mod(mask_mod, B: int, T: int, S: int, device=None) -> torch.Tensor:
    """Evaluate a mask_mod on the full index grid -> (B, 1, T, S) bool."""
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(T, device=device)[None, None, :, None]
    k = torch.arange(S, device=device)[None, None, None, :]
    return mask_mod(b, h, q, k).expand(B, 1, T, S)


def block_from_mask_mod(mask_mod, B: int, T: int, S: int, device=None):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, None, T, S, device=str(device or "cpu"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, K, S, D) with K dividing H (GQA). Returns (B, H, T, D).
    Scale is 1/sqrt(head_dim). FlexAttention has no dropout, so that path trains without it."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask is CAUSAL or mask is FULL:
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is CAUSAL, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=True)
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # FlexAttention has no CPU backward: train through the same mask_mod, evaluated densely
        dense = dense_from_mask_mod(mask.mask_mod, q.shape[0], q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=True)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
