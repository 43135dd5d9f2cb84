"""DiDA: discrete diffusion adaptation (SPEC §5; paper §4.3). Parallel decoding of an image's codes,
and the attention pattern its adaptation trains with.

Legend: B batch rows (conditional, unconditional), N = h*w codes of one image, m of them still masked,
V vocab size, M codebook size, L cached prefix length.

Inference (`DiDASampler`, an `ImageSampler` for model.generate): the text prefix and the image's size
header are in the KV cache. All N codes start in the mask state; each of K steps runs the N positions
in ONE forward (each masked position sees the whole prefix and every position of its image,
bidirectionally), scores only the still-masked positions and only over the visual codes (at the demo
size the full-vocabulary head over every position was a third of a step's FLOPs), samples a code for
each of them (inverse-CDF sampling), and fixes the most confident ones so that
`N * cos(pi/2 * (k+1)/K)` stay masked (MaskGIT's schedule). Confidence is log-prob plus Gumbel noise
whose temperature falls linearly to 0; a fixed code is never re-masked; at least one code is fixed per
step and all are fixed after step K. Guidance applies to the visual codes with the conditional and
unconditional rows batched. The finished image (codes, EOLs, EOI) then enters the cache in one causal
chunk and text generation carries on autoregressively.

Positions: code (r, c) of an image whose first code would sit at position p sits at p + r*(w+1) + c, the
position it has in the serialized sequence (EOLs between rows), so the adapted model sees the same
rotary positions as the AR model. The mask state is the id `Vocab.extra(1)` (<|extra_1|>): the release
names none; an unused extra keeps the vocabulary unchanged.
"""

from __future__ import annotations

import math

import torch

MASK_EXTRA = 1


def mask_id(vocab) -> int:
    return vocab.extra(MASK_EXTRA)


def mask_schedule(num_steps: int, n: int) -> list[int]:
    """How many of n codes stay masked after each of `num_steps` steps: the cosine schedule
    floor(n * cos(pi/2 * (k+1)/K)), lowered where needed so every step fixes at least one code, and
    0 after the last step (with K > n the tail steps have nothing left to fix)."""
    left, out = n, []
    for k in range(num_steps):
        target = 0 if k == num_steps - 1 else math.floor(n * math.cos(math.pi / 2 * (k + 1) / num_steps))
        left = max(0, min(target, left - 1))
        out.append(left)
    return out


def code_positions(h: int, w: int) -> torch.Tensor:
    """(N,) offsets of the codes from the first code's position (EOL slots skipped)."""
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None, :]
    return (r * (w + 1) + c).reshape(-1)


class DiDASampler:
    """Parallel image decoding in `num_steps` forwards. `noise_temperature` is the Gumbel temperature
    at step 0 (falls linearly to 0)."""

    def __init__(self, num_steps: int = 8, noise_temperature: float = 2.0):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
        if noise_temperature < 0:
            raise ValueError(f"noise_temperature: must be >= 0, got {noise_temperature}")
        self.num_steps, self.noise_temperature = num_steps, noise_temperature
        self.forwards = 0  # sequential forward passes of the last image (for benchmarks)

    @torch.no_grad()
    def sample(self, run, height: int, width: int):
        from model.generate import Cancelled, ImageProgress
        from model.sampling import guide

        model, vocab, prefix, params = run.model, run.vocab, run.prefix, run.params
        cache, device = prefix.cache, prefix.cache.k.device
        n, rows, start = height * width, prefix.num_rows, prefix.cache.length
        if start + n + height > cache.max_length:  # the finished span: codes, EOLs and EOI
            return None
        codes = torch.full((n,), -1, dtype=torch.long, device=device)  # -1: still masked
        positions = cache.next_position[:, None] + code_positions(height, width).to(device)[None]  # (B, N)
        # every block position sees the valid prefix keys and the whole block
        mask = None
        if cache.key_valid is not None:
            mask = torch.ones(rows, 1, n, start + n, dtype=torch.bool, device=device)
            mask[:, :, :, :start] = cache.key_valid[:, None, None, :start]
        from model.attention import FULL

        lo, hi = vocab.visual_start, vocab.size
        self.forwards = 0
        schedule = mask_schedule(self.num_steps, n)
        for k, keep_masked in enumerate(schedule):
            if k and schedule[k - 1] == 0:
                break  # everything is fixed already
            if run.should_stop():
                raise Cancelled()
            masked = (codes < 0).nonzero().squeeze(1)  # (m,) the positions still to decide
            ids = torch.where(codes >= 0, codes + lo, torch.full_like(codes, mask_id(vocab)))
            # only the masked positions are scored, and only over the visual codes: (B, m, M)
            logits = model(ids[None].expand(rows, n), cache=cache, positions=positions,
                           mask=mask if mask is not None else FULL, score=masked, vocab_range=(lo, hi))
            cache.crop(start)  # the block is re-fed next step; the prefix stays
            self.forwards += 1
            logits = logits.float()
            scores = guide(logits[0], logits[1], params.guidance_scale) if run.guided else \
                torch.log_softmax(logits[0], -1)  # (m, M)
            candidates = _sample_codes(scores, params, run.generator)  # (m,)
            confidence = torch.log_softmax(scores, -1).gather(-1, candidates[:, None]).squeeze(-1)  # (m,)
            temp = self.noise_temperature * (1 - (k + 1) / self.num_steps)
            if temp > 0:  # one draw per position of the image, so a seed gives the same noise to a position
                u = torch.rand(n, generator=run.generator, device=device).clamp_(1e-9, 1 - 1e-9)[masked]
                confidence = confidence + temp * -torch.log(-torch.log(u))
            fix = torch.topk(confidence, len(masked) - keep_masked).indices  # the most confident
            codes[masked[fix]] = candidates[fix]
            yield ImageProgress(int((codes >= 0).sum()) * height // n, height)
        grid = codes.view(height, width)
        span = vocab.image_ids(grid)[vocab.image_ids(grid).index(vocab.img) + 1:]  # codes, EOLs, EOI
        return run.feed_many(span)


def _sample_codes(scores: torch.Tensor, params, generator) -> torch.Tensor:
    """scores (m, M) -> one code per masked position with the image temperature / top-k / top-p."""
    from model.sampling import sample

    return sample(scores, params.image_temperature, params.image_top_k, params.image_top_p, generator)


def training_mask_mod(doc_ids: torch.Tensor, noisy_image: torch.Tensor, limit: torch.Tensor):
    """mask_mod for DiDA adaptation (paper §4.3): a packed sequence holds clean tokens and, appended,
    a noisy copy of each image. doc_ids (B, T): document of each token; noisy_image (B, T): image id
    (> 0) of a noisy token, 0 for clean tokens; limit (B, T): a query sees clean keys with index below
    its limit (q + 1 for a clean token: causal; the index of its image's first clean code for a noisy
    token: only what precedes the image). Noisy tokens also see every noisy token of the same image;
    clean tokens never see noisy ones."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        clean_kv = noisy_image[b, kv_idx] == 0
        qi = noisy_image[b, q_idx]
        return same_doc & ((clean_kv & (kv_idx < limit[b, q_idx])) | ((qi > 0) & (noisy_image[b, kv_idx] == qi)))

    return mask_mod


def add_noisy_copies(ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, vocab,
                     generator: torch.Generator | None = None):
    """Append to each packed row a noisy copy of every image in it (paper §4.3): each code is replaced
    by the mask id with probability r, r ~ U(0, 1] drawn per image. Returns a dict of (B, T + M)
    tensors `ids`, `positions`, `doc_ids`, `noisy_image`, `limit` (for training_mask_mod) and
    `targets` (B, M): the clean code id where the copy is masked, -100 elsewhere (no loss). M is the
    largest number of codes in a row; shorter rows are padded (doc 0, never a target)."""
    B, T = ids.shape
    device = ids.device
    lo, hi = vocab.visual_start, vocab.size
    per_row = []
    for b in range(B):
        row = ids[b]
        code_at = ((row >= lo) & (row < hi)).nonzero().squeeze(1)  # (m,) indices of the codes
        img_marks = (row == vocab.img).nonzero().squeeze(1)  # IMG of each image, in order
        image_no = torch.cumsum(row == vocab.img, 0)[code_at]  # 1-based image of each code
        ratio = torch.rand(len(img_marks) + 1, generator=generator, device=device).clamp_(min=1e-3)
        masked = torch.rand(len(code_at), generator=generator, device=device) < ratio[image_no]
        per_row.append((code_at, image_no, img_marks, masked))
    M = max(1, max(len(r[0]) for r in per_row))
    ext = {k: torch.zeros(B, T + M, dtype=torch.long, device=device)
           for k in ("ids", "positions", "doc_ids", "noisy_image", "limit")}
    targets = torch.full((B, M), -100, dtype=torch.long, device=device)
    ext["ids"][:, :T], ext["positions"][:, :T], ext["doc_ids"][:, :T] = ids, positions, doc_ids
    ext["ids"][:, T:] = vocab.pad
    ext["limit"][:] = torch.arange(1, T + M + 1, device=device)  # clean tokens: causal
    for b, (code_at, image_no, img_marks, masked) in enumerate(per_row):
        m = len(code_at)
        clean = ids[b, code_at]
        ext["ids"][b, T:T + m] = torch.where(masked, torch.full_like(clean, mask_id(vocab)), clean)
        ext["positions"][b, T:T + m] = positions[b, code_at]
        ext["doc_ids"][b, T:T + m] = doc_ids[b, code_at]
        ext["noisy_image"][b, T:T + m] = image_no
        ext["limit"][b, T:T + m] = img_marks[image_no - 1] + 1  # the prefix up to and including IMG
        targets[b, :m] = torch.where(masked, clean, torch.full_like(clean, -100))
    return {**ext, "targets": targets}
