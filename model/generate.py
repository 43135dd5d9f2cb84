"""Streaming generation: text token by token, images through the decoding FSM (SPEC §3).

`generate(...)` is a Python generator of events: `TextDelta` as text is produced, `ImageStarted` /
`ImageProgress` / `ImageDone` for each image, and one final `Finished`. With guidance, the conditional
and the unconditional prompt run as two rows of one batch (left-padded) sharing one forward per token;
guidance touches visual codes only. Every generated token, forced ones included, is fed to both rows.

The image phase is autoregressive here; the DiDA sampler (SPEC §5) plugs in at the same point later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from model.sampling import DecodeFSM, SamplingParams, guide, sample


@dataclass
class TextDelta:
    text: str


@dataclass
class ImageStarted:
    height: int
    width: int


@dataclass
class ImageProgress:
    rows_done: int
    rows_total: int


@dataclass
class ImageDone:
    codes: torch.Tensor  # (h, w) long
    image: object = None  # whatever `decode_image` returned, if given


@dataclass
class Finished:
    token_ids: list[int] = field(default_factory=list)  # every generated id, structural ones included
    reason: str = "eos"  # "eos" | "max_new_tokens" | "context"


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (B, T) ids and (B, T) bool validity, padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        valid[i, T - len(r):] = True
    return ids, valid


def compile_decode(model) -> Callable:
    """A torch.compile'd one-token decode step, `step(ids (B, 1), cache) -> logits (B, 1, V)`.
    Shapes that grow with the cache are marked dynamic, so it compiles once."""
    return torch.compile(lambda ids, cache: model(ids, cache=cache), dynamic=True)


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, params: SamplingParams, generator: torch.Generator | None = None,
             uncond_ids: list[int] | None = None, image_size: tuple[int, int] | None = None,
             tokenizer=None, vocab=None, decode_image: Callable | None = None,
             decode_step: Callable | None = None, start_with_image: bool = False) -> Iterator[object]:
    """Yield events for one answer to `prompt_ids`.

    params: sampling settings (text and image filters, guidance_scale, max_new_tokens).
    uncond_ids: the unconditional prompt; guidance runs when it is given and guidance_scale != 1.
    image_size: (h, w) in tokens to force every image's header; None samples the first header and
        reuses it for later images.
    tokenizer: for TextDelta; without one, text deltas are not emitted (ids are in Finished).
    decode_image: codes (h, w) -> image, called on each finished image.
    decode_step: e.g. compile_decode(model), used for one-token steps.
    start_with_image: the answer opens with an image (BOI forced first), as t2i and x2i answers do.
    """
    vocab = vocab or model.vocab
    if vocab is None:
        raise ValueError("vocab: the model has no vocabulary attached; pass vocab=")
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    guided = uncond_ids is not None and params.guidance_scale != 1.0
    rows = [list(prompt_ids)] + ([list(uncond_ids)] if guided else [])
    longest = max(len(r) for r in rows)
    if longest >= context:
        raise ValueError(f"prompt_ids: the prompt has {longest} tokens but the context is {context} "
                         "(max_position_embeddings); shorten the history or the prompt")
    device = model.lm_head.weight.device
    ids, valid = left_pad(rows, vocab.pad)
    cache = model.new_cache(len(rows), min(context, longest + params.max_new_tokens))
    padded = bool((~valid).any())
    logits = model(ids.to(device), cache=cache, attention_mask=valid.to(device) if padded else None,
                   last_only=True)[:, -1].float()  # (B, V)
    step = decode_step or (lambda x, c: model(x, cache=c))

    fsm = DecodeFSM(vocab, model.config.vocab_size, image_size=image_size, start_with_image=start_with_image,
                    device=device)
    stream = tokenizer.stream_decoder() if tokenizer is not None else None
    out: list[int] = []
    reason = "max_new_tokens"
    for _ in range(params.max_new_tokens):
        token = fsm.forced()
        if token is None:
            row = guide(logits[0], logits[1], params.guidance_scale) if guided and fsm.in_grid else logits[0]
            row = fsm.constrain(row)[None]
            if fsm.in_grid:
                token = sample(row, params.image_temperature, params.image_top_k, params.image_top_p, generator)
            else:
                token = sample(row, params.text_temperature, params.text_top_k, params.text_top_p, generator)
            token = int(token[0])
        was_text = not fsm.in_image
        grid = fsm.advance(token)
        out.append(token)
        if stream is not None and was_text and token < vocab.num_text_tokens:
            delta = stream.push(token)
            if delta:
                yield TextDelta(delta)
        if fsm.in_grid and token == vocab.img:
            yield ImageStarted(*fsm.size)
        elif fsm.in_grid and token == vocab.eol:
            yield ImageProgress(len(fsm.codes) // fsm.size[1], fsm.size[0])
        if grid is not None:
            codes = torch.tensor(grid, dtype=torch.long)
            yield ImageProgress(len(grid), len(grid))
            yield ImageDone(codes, decode_image(codes) if decode_image is not None else None)
        if token == vocab.eos and not fsm.in_image:
            reason = "eos"
            break
        if cache.length >= cache.max_length:
            reason = "context" if cache.max_length == context else "max_new_tokens"
            break
        logits = step(torch.full((len(rows), 1), token, dtype=torch.long, device=device), cache)[:, -1].float()
    if stream is not None:
        tail = stream.flush()
        if tail:
            yield TextDelta(tail)
    yield Finished(out, reason)
