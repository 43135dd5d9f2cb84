"""Streaming generation: text token by token, images through an image sampler (SPEC §3).

`generate(...)` is a Python generator of events: `TextDelta` as text is produced, `ImageStarted` /
`ImageProgress` / `ImageDone` for each image, and one final `Finished`. With guidance, the conditional
and the unconditional prompt run as two rows of one batch sharing one forward per step; guidance
touches visual codes only. Every generated token, forced ones included, is fed to both rows.

The image phase goes through an `ImageSampler`: once the FSM has read an image's size header, the
sampler fills the h x w grid and leaves the cache holding the whole span (codes, EOLs, EOI).
`ARImageSampler` is the release's token-by-token decoder; DiDA (SPEC §5) is another implementation.

`PrefixCache` keeps a KV cache together with the ids in its slots, so a session's next turn reuses the
cached prefix: only the tokens after the longest shared prefix are computed.

Legend: B batch rows (1, or 2 with guidance: conditional, unconditional), V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from model.sampling import DecodeFSM, SamplingParams, guide, sample

PAD_SLOT = -1  # a cache slot holding padding, in PrefixCache.slots


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
    reason: str = "eos"  # "eos" (a stop id) | "max_new_tokens" | "context" | "cancelled"


class Cancelled(Exception):
    """Raised inside a sampler when the caller asked generation to stop."""


def eager_decode(model) -> Callable:
    """The eager one-token step, `step(ids (B, 1), cache, vocab_range=None) -> logits (B, 1, V)`
    (or (B, 1, hi - lo) over the ids of `vocab_range`)."""
    return lambda ids, cache, vocab_range=None: model(ids, cache=cache, vocab_range=vocab_range)


def compile_decode(model) -> Callable:
    """eager_decode, torch.compile'd. Shapes that grow with the cache are marked dynamic, so it compiles
    once per vocab_range (the full head for text, the visual codes inside an image grid)."""
    return torch.compile(eager_decode(model), dynamic=True)


class PrefixCache:
    """A KVCache plus, per row, the id in each slot (PAD_SLOT for padding)."""

    def __init__(self, model, num_rows: int, max_length: int | None = None):
        self.cache = model.new_cache(num_rows, max_length)
        self.slots: list[list[int]] = [[] for _ in range(num_rows)]
        self.reused = 0  # slots reused by the last prefill

    @property
    def num_rows(self) -> int:
        return len(self.slots)

    def _reusable(self, rows: list[list[int]]) -> int:
        """Longest cache length L whose real ids, per row, are a prefix of that row, leaving every row
        at least one id to feed (the next logits must come from a forward)."""
        best = len(self.slots[0])
        for slots, row in zip(self.slots, rows):
            real = 0
            for i, t in enumerate(slots):
                if t == PAD_SLOT:
                    continue
                if real >= len(row) - 1 or row[real] != t:
                    best = min(best, i)
                    break
                real += 1
        return best

    @torch.no_grad()
    def prefill(self, model, rows: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Bring the cache to `rows` (one id list per row) and return (logits (B, V) after each row's
        last id, number of cached slots reused). Rows of different lengths are padded on the left of
        the new chunk; padding is masked and takes no rotary position."""
        if len(rows) != self.num_rows or any(not r for r in rows):
            raise ValueError(f"rows: need {self.num_rows} non-empty id lists, got {[len(r) for r in rows]}")
        keep = self._reusable(rows)
        new = []
        for slots, row in zip(self.slots, rows):
            real = sum(1 for t in slots[:keep] if t != PAD_SLOT)
            new.append(row[real:])
        T = max(len(n) for n in new)
        if keep + T > self.cache.max_length:  # padding used up the room: start over
            self.cache.crop(0)
            self.slots = [[] for _ in rows]
            keep, new, T = 0, [list(r) for r in rows], max(len(r) for r in rows)
        self.cache.crop(keep)
        for s in self.slots:
            del s[keep:]
        device = self.cache.k.device
        ids = torch.full((self.num_rows, T), 0, dtype=torch.long, device=device)
        valid = torch.zeros(self.num_rows, T, dtype=torch.bool, device=device)
        for i, n in enumerate(new):
            ids[i, T - len(n):] = torch.tensor(n, dtype=torch.long, device=device)
            valid[i, T - len(n):] = True
            self.slots[i] += [PAD_SLOT] * (T - len(n)) + n
        padded = bool((~valid).any())
        logits = model(ids, cache=self.cache, attention_mask=valid if padded else None, last_only=True)
        self.reused = keep
        return logits[:, -1].float(), keep

    def feed_many(self, model, tokens: list[int]) -> torch.Tensor:
        """Append the same ids to every row in one forward; return the logits (B, V) after the last."""
        device = self.cache.k.device
        ids = torch.tensor([tokens] * self.num_rows, dtype=torch.long, device=device)
        for s in self.slots:
            s.extend(tokens)
        return model(ids, cache=self.cache, last_only=True)[:, -1].float()

    def feed(self, step, token: int, vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Append one id to every row; return the next logits (B, V), or (B, hi - lo) over vocab_range."""
        ids = torch.full((self.num_rows, 1), token, dtype=torch.long, device=self.cache.k.device)
        for s in self.slots:
            s.append(token)
        return step(ids, self.cache, vocab_range)[:, -1].float()

    @property
    def full(self) -> bool:
        return self.cache.length >= self.cache.max_length


class Run:
    """The state one generation shares with its image sampler."""

    def __init__(self, model, vocab, prefix: PrefixCache, logits, fsm: DecodeFSM, params: SamplingParams,
                 guided: bool, generator, step, should_stop):
        self.model, self.vocab, self.prefix, self.logits, self.fsm = model, vocab, prefix, logits, fsm
        self.budget_end = prefix.cache.length + params.max_new_tokens
        self.params, self.guided, self.generator, self.step = params, guided, generator, step
        self.should_stop = should_stop or (lambda: False)
        self.out: list[int] = []

    def feed(self, token: int):
        """Record `token`, advance the FSM and the cache. Returns the finished grid if it closed an image.
        Inside a grid only visual codes can come next, so `logits` then covers the codes alone
        (B, codebook_size), index 0 being `vocab.visual_start`; elsewhere it is (B, V)."""
        grid = self.fsm.advance(token)
        self.out.append(token)
        if not self.prefix.full:
            codes = (self.vocab.visual_start, self.vocab.size) if self.fsm.in_grid else None
            self.logits = self.prefix.feed(self.step, token, codes)
        return grid

    def feed_many(self, tokens: list[int]):
        """Record several ids, advance the FSM over them, and run them through the cache in one causal
        chunk (a parallel sampler's finished image). Returns the grid if they closed an image."""
        if self.prefix.cache.length + len(tokens) > self.prefix.cache.max_length:
            raise ValueError("context: the image does not fit in the remaining context")
        grid = None
        for t in tokens:
            grid = self.fsm.advance(t) or grid
        self.out += tokens
        self.logits = self.prefix.feed_many(self.model, tokens)
        return grid

    def out_of_room(self) -> str | None:
        """"max_new_tokens" when the budget is spent, "context" when the cache is full, else None."""
        if self.prefix.cache.length >= self.budget_end:
            return "max_new_tokens"
        return "context" if self.prefix.full else None

    def image_logits(self) -> torch.Tensor:
        """(1, codebook_size) scores for the next visual code (index 0 = vocab.visual_start): guided
        (cond row vs uncond row) when enabled. Inside a grid the logits are the codes' alone, so guidance's
        log-softmax runs over the codes; that shifts each row by a constant and changes no choice."""
        row = guide(self.logits[0], self.logits[1], self.params.guidance_scale) if self.guided else self.logits[0]
        return row[None]


class ImageSampler(Protocol):
    def sample(self, run: Run, height: int, width: int) -> Iterator[object]:
        """Fill an h x w grid, feeding every id (codes, EOL between rows, EOI) through `run.feed`, and
        yield ImageProgress events; return the code grid (list of h rows) as the generator's value, or
        None when `run.out_of_room()` stops it first."""
        ...


class ARImageSampler:
    """The release's image decoder: one visual code per forward, EOL after each row, EOI at the end."""

    def sample(self, run: Run, height: int, width: int):
        grid = None
        while grid is None:
            if run.prefix.full:  # an open image may run past max_new_tokens, never past the context
                return None
            if run.should_stop():
                raise Cancelled()
            forced = run.fsm.forced()
            if forced is None:  # every visual code is allowed here, and image_logits holds only those
                p = run.params
                code = sample(run.image_logits(), p.image_temperature, p.image_top_k, p.image_top_p, run.generator)
                forced = run.vocab.visual_start + int(code[0])
            grid = run.feed(forced)
            if forced == run.vocab.eol:
                yield ImageProgress(len(run.fsm.codes) // width, height)
        yield ImageProgress(height, height)
        return grid


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, params: SamplingParams, generator: torch.Generator | None = None,
             uncond_ids: list[int] | None = None, image_size: tuple[int, int] | None = None,
             tokenizer=None, vocab=None, decode_image: Callable | None = None,
             decode_step: Callable | None = None, start_with_image: bool = False,
             stop_ids: tuple[int, ...] | None = None, min_images: int = 0, max_images: int | None = None,
             max_text_tokens: int | None = None, min_text_tokens: int = 0, prefix: PrefixCache | None = None,
             image_sampler: ImageSampler | None = None, should_stop: Callable[[], bool] | None = None
             ) -> Iterator[object]:
    """Yield events for one answer to `prompt_ids`.

    params: sampling settings (text and image filters, guidance_scale, max_new_tokens).
    uncond_ids: the unconditional prompt; guidance runs when it is given and guidance_scale != 1.
    image_size: (h, w) in tokens to force every image's header; None samples the first header and
        reuses it for later images.
    tokenizer: for TextDelta; without one, text deltas are not emitted (ids are in Finished).
    decode_image: codes (h, w) -> image, called on each finished image.
    decode_step: `step(ids, cache, vocab_range)` for one-token steps (eager_decode's contract), e.g.
        compile_decode(model).
    start_with_image, stop_ids (default: EOS), min_images, max_images, max_text_tokens,
        min_text_tokens: the turn's
        shape, enforced by the FSM (see sampling.DecodeFSM).
    prefix: a PrefixCache to reuse (and leave holding this answer); by default a fresh one.
    image_sampler: fills image grids; default ARImageSampler.
    should_stop: polled between tokens; when it returns True, generation ends with reason "cancelled".
    """
    vocab = vocab or model.vocab
    if vocab is None:
        raise ValueError("vocab: the model has no vocabulary attached; pass vocab=")
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    if uncond_ids is not None and not uncond_ids:
        raise ValueError("uncond_ids: must not be empty (pass None for no guidance)")
    guided = uncond_ids is not None and params.guidance_scale != 1.0
    rows = [list(prompt_ids)] + ([list(uncond_ids)] if guided else [])
    for name, row in zip(("prompt_ids", "uncond_ids"), rows):
        bad = [t for t in row if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"{name}: id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    device = model.lm_head.weight.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: it is on {generator.device} but the model is on {device}; "
                         f"use torch.Generator(device={str(device)!r})")
    longest = max(len(r) for r in rows)
    # an image may finish past max_new_tokens: leave room for the largest one this call can open
    h, w = image_size if image_size is not None else (99, 99)
    span = h * w + h + 2 * len(str(max(h, w))) + 3
    if longest >= context or (image_size is not None and (start_with_image or min_images)
                               and longest + span > context):
        raise ValueError(f"prompt_ids: the prompt has {longest} tokens; with the answer's image "
                         f"({h}x{w} tokens) it does not fit the context of {context} (max_position_embeddings); "
                         "shorten the history or the prompt, or ask for a smaller image")
    if prefix is None or prefix.num_rows != len(rows):
        prefix = PrefixCache(model, len(rows), min(context, longest + params.max_new_tokens + span))
    logits, _ = prefix.prefill(model, rows)
    stop_ids = tuple(stop_ids) if stop_ids is not None else (vocab.eos,)
    fsm = DecodeFSM(vocab, model.config.vocab_size, image_size=image_size, start_with_image=start_with_image,
                    stop_ids=stop_ids, min_images=min_images, max_images=max_images,
                    max_text_tokens=max_text_tokens, min_text_tokens=min_text_tokens, device=logits.device)
    run = Run(model, vocab, prefix, logits, fsm, params, guided, generator,
              decode_step or eager_decode(model), should_stop)
    image_sampler = image_sampler or ARImageSampler()
    stream = tokenizer.stream_decoder() if tokenizer is not None else None
    reason = None
    try:
        while reason is None:
            if run.should_stop():
                raise Cancelled()
            token = fsm.forced()
            if token is None:
                row = fsm.constrain(run.logits[0])[None]
                token = int(sample(row, params.text_temperature, params.text_top_k, params.text_top_p, generator)[0])
            was_text = not fsm.in_image
            run.feed(token)
            if stream is not None and was_text and token < vocab.num_text_tokens:
                delta = stream.push(token)
                if delta:
                    yield TextDelta(delta)
            if fsm.in_grid:  # the header is complete: the sampler fills the grid
                h, w = fsm.size
                yield ImageStarted(h, w)
                grid = yield from image_sampler.sample(run, h, w)
                if grid is None:  # the image did not fit: the answer ends here, never with half a grid
                    reason = run.out_of_room() or "context"
                    break
                codes = torch.tensor(grid, dtype=torch.long)
                yield ImageDone(codes, decode_image(codes) if decode_image is not None else None)
            elif was_text and token in stop_ids:
                reason = "eos"
                break
            reason = run.out_of_room()
    except Cancelled:
        reason = "cancelled"
    if stream is not None:
        tail = stream.flush()
        if tail:
            yield TextDelta(tail)
    yield Finished(run.out, reason)
