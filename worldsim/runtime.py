"""The model side of the engine: the loaded decoder, tokenizers and vision tokenizer, per-session
prefix caches (LRU), the context budget, and running one turn's generation.

Default model: the embedded checkpoint in assets/ when it exists; otherwise the `debug` preset with
random weights (a warning says so): the engine, stores and UI work, the pictures are noise.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import threading
import time

import torch

from worldsim.modes import Layout, TurnShape

log = logging.getLogger("worldsim.runtime")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_CHECKPOINT = os.path.join(ASSETS, "demo")
NATIVE_FILE = "worldsim.json"  # optional, beside a checkpoint: {"image_area": pixels it was trained at}


class Runtime:
    def __init__(self, model, vq, max_cached_sessions: int = 8, image_sampler=None, name: str = ""):
        if model.tokenizer is None:
            raise ValueError("checkpoint: the model has no tokenizer files; the engine needs one")
        if vq is not None and vq.config.codebook_size != model.vocab.codebook_size:
            raise ValueError(f"vision_tokenizer: codebook_size {vq.config.codebook_size} does not match the "
                             f"model's {model.vocab.codebook_size}")
        self.model, self.vq, self.name = model, vq, name
        self.tokenizer, self.vocab = model.tokenizer, model.vocab
        self.device = model.lm_head.weight.device
        self.image_sampler = image_sampler
        self.max_cached_sessions = max_cached_sessions
        self.caches: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.lock = threading.Lock()  # one generation at a time on this model
        self.stats = {"cache_hits": 0, "cache_misses": 0}
        self.native_image_area: int | None = None  # pixels per image in the checkpoint's training data

    @classmethod
    def load(cls, checkpoint: str | None = None, device: str = "cpu", **kw) -> "Runtime":
        from model import load_pretrained
        from model.vision_tokenizer import load_ibq

        if checkpoint is None and os.path.isdir(DEFAULT_CHECKPOINT):
            checkpoint = DEFAULT_CHECKPOINT
        if checkpoint is None:
            return cls.debug(device, **kw)
        # Shipped weights are fp16 (size budget); a CPU computes in fp32 (half matmuls are slow there).
        model = load_pretrained(checkpoint, device=device, dtype=torch.float32 if str(device) == "cpu" else None)
        vq_dir = os.path.join(checkpoint, "vision_tokenizer")
        vq = load_ibq(vq_dir, device=device).eval() if os.path.isdir(vq_dir) else None
        if vq is None:
            raise ValueError(f"checkpoint: {checkpoint} has no vision_tokenizer/ folder; the engine needs one")
        runtime = cls(model, vq, name=checkpoint, **kw)
        meta = os.path.join(checkpoint, NATIVE_FILE)
        if os.path.isfile(meta):
            with open(meta) as f:
                runtime.native_image_area = int(json.load(f)["image_area"])
        return runtime

    @classmethod
    def debug(cls, device: str = "cpu", preset_name: str = "debug", config=None, **kw) -> "Runtime":
        """A preset (or `config`) with RANDOM weights, the built-in BPE and a random IBQ of the same
        codebook size: for tests, benchmarks and the app before a checkpoint exists."""
        from model.config import preset
        from model.text_tokenizer import BPETokenizer, builtin_corpus
        from model.transformer import Transformer
        from model.vision_tokenizer import IBQ, ibq_preset

        log.warning("no trained checkpoint: using the %s preset with RANDOM weights (images are noise)", preset_name)
        torch.manual_seed(0)
        cfg = config or preset(preset_name)
        tokenizer = BPETokenizer.train(builtin_corpus(), cfg.num_text_tokens, cfg.codebook_size)
        model = Transformer(cfg).to(device).eval()
        model.vocab, model.tokenizer = tokenizer.vocab, tokenizer
        vq_cfg = dataclasses.replace(ibq_preset("debug" if preset_name == "debug" else "demo"),
                                     codebook_size=cfg.codebook_size)
        return cls(model, IBQ(vq_cfg).to(device).eval(), name=f"{preset_name} (random weights)", **kw)

    # ---- images ------------------------------------------------------------------------------
    @property
    def patch(self) -> int:
        return self.vq.config.downsample_factor

    def max_image_side(self) -> int:
        """The largest square grid side (tokens) allowed: an image takes at most 1/8 of the context."""
        return min(99, max(1, int(math.sqrt(self.model.config.max_position_embeddings / 8))))

    def default_image_size(self, image_area: int, aspect: tuple[int, int] | None = None) -> tuple[int, int]:
        """(rows, cols) for the task's pixel area, at most the area the checkpoint was trained on (its
        worldsim.json `image_area`, when it has one): square, or with `aspect` = an image's (width,
        height) that image's shape, the grid encode_image gives it (area_grid: a 160x120 ViZDoom frame at
        64x64 px and factor 4 is 14 x 18, the grid the demo was trained on). No side exceeds
        max_image_side()."""
        from model.vision_tokenizer import area_grid

        if self.native_image_area:
            image_area = min(image_area, self.native_image_area)
        rows, cols = area_grid(*(aspect or (1, 1)), image_area, self.patch)
        shrink = min(1.0, self.max_image_side() / max(rows, cols))
        return max(1, round(rows * shrink)), max(1, round(cols * shrink))

    @torch.no_grad()
    def encode_image(self, image, size: tuple[int, int]) -> tuple[list[list[int]], object]:
        """PIL image -> (code grid, the resized PIL image the codes stand for). The grid keeps the
        image's aspect ratio at about size[0]*size[1] tokens."""
        from model.vision_tokenizer import resize_to_area, to_tensor

        resized = resize_to_area(image, size[0] * size[1] * self.patch ** 2, self.patch)
        codes = self.vq.encode(to_tensor(resized)[None].to(self.device))[0]  # (h, w)
        return codes.tolist(), resized

    @torch.no_grad()
    def decode_image(self, codes: torch.Tensor):
        from model.vision_tokenizer import to_pil

        return to_pil(self.vq.decode(codes[None].to(self.device))[0])

    def sampler_for(self, dida_steps: int | None):
        """(image sampler, its name): DiDA with K steps when asked (K > 0) or, by default, when the
        checkpoint is DiDA-adapted (config.dida_steps > 0); autoregressive for K = 0 or otherwise."""
        from model.dida import DiDASampler

        if self.image_sampler is not None and dida_steps is None:
            return self.image_sampler, type(self.image_sampler).__name__
        k = self.model.config.dida_steps if dida_steps is None else dida_steps
        return (DiDASampler(k), f"dida-{k}") if k > 0 else (None, "ar")

    # ---- caches ------------------------------------------------------------------------------
    def _prefix(self, session_id: str | None, rows: int):
        from model.generate import PrefixCache

        cached = self.caches.get(session_id) if session_id else None
        if cached is not None and cached.num_rows == rows:
            self.caches.move_to_end(session_id)
            return cached
        prefix = PrefixCache(self.model, rows)
        if session_id:
            self.caches[session_id] = prefix
            while len(self.caches) > self.max_cached_sessions:
                self.caches.popitem(last=False)
        return prefix

    def forget(self, session_id: str) -> None:
        self.caches.pop(session_id, None)

    # ---- one turn ----------------------------------------------------------------------------
    def reserve(self, shape: TurnShape, size: tuple[int, int]) -> int:
        h, w = size
        return shape.max_images * (h * w + h + 8) + (shape.max_images + 1) * shape.max_text_tokens + 4

    def fit(self, cond: list[list[int]], uncond: list[list[int]] | None, reserve: int, seqs: list[int],
            already_dropped: list[int] = ()):
        """Drop the oldest turns (never turn 0: the prompt and first image; never the pending last one)
        until the rows plus `reserve` fit the context. Returns (cond ids, uncond ids or None, dropped seqs).

        The window slides in jumps, so the cached prefix stays valid for several turns: it starts from
        the turns the previous turn had dropped, and when more must go it frees a quarter of the context
        beyond what is needed."""
        context = self.model.config.max_position_embeddings
        keep = [i for i, s in enumerate(seqs) if i == 0 or i == len(seqs) - 1 or s not in set(already_dropped)]
        size = lambda: max(sum(len(cond[i]) for i in keep),  # noqa: E731
                           sum(len(uncond[i]) for i in keep) if uncond else 0)
        if size() + reserve > context:
            while size() + reserve + context // 4 > context and len(keep) > 2:
                keep.pop(1)
        if size() + reserve > context:
            raise ValueError(f"prompt: the prompt and the answer's room ({reserve} tokens) do not fit the context "
                             f"of {context} tokens; shorten the prompt or use smaller images")
        dropped = [seqs[i] for i in range(len(cond)) if i not in keep]
        flat = lambda pieces: [t for i in keep for t in pieces[i]]  # noqa: E731
        return flat(cond), (flat(uncond) if uncond else None), dropped

    def run_turn(self, *, session_id: str | None, mode: str, turns: list[dict], seqs: list[int], shape: TurnShape,
                 params, seed: int, image_size: tuple[int, int], image_ids, on_event=None, should_stop=None,
                 already_dropped: list[int] = (), dida_steps: int | None = None) -> dict:
        """Generate the answer of the last (pending) turn in `turns`. Returns
        {"ids", "images": [(codes tensor, PIL)], "reason", "meta"}; on_event gets engine events."""
        from model.generate import Finished, ImageDone, ImageProgress, ImageStarted, TextDelta, generate

        sampler, sampler_name = self.sampler_for(dida_steps)

        layout = Layout(self.tokenizer, image_ids)
        guided = params.guidance_scale != 1.0
        cond = layout.turn_pieces(mode, turns, conditional=True)
        uncond = layout.turn_pieces(mode, turns, conditional=False) if guided else None
        cond_ids, uncond_ids, dropped = self.fit(cond, uncond, self.reserve(shape, image_size), seqs, already_dropped)
        emit = on_event or (lambda e: None)
        v = self.vocab
        with self.lock:
            key = None if mode in ("t2i", "x2i") else session_id
            prefix = self._prefix(key, 2 if guided else 1)
            start = time.perf_counter()
            images, result = [], None
            gen = torch.Generator(device=self.device).manual_seed(seed)
            for ev in generate(self.model, cond_ids, uncond_ids=uncond_ids, params=params, generator=gen,
                               image_size=image_size, tokenizer=self.tokenizer, prefix=prefix,
                               decode_image=self.decode_image, start_with_image=shape.start_with_image,
                               stop_ids=(v.answer_end, v.eos), min_images=shape.min_images,
                               max_images=shape.max_images, max_text_tokens=shape.max_text_tokens,
                               min_text_tokens=shape.min_text_tokens,
                               image_sampler=sampler, should_stop=should_stop):
                if isinstance(ev, TextDelta):
                    emit({"type": "text", "text": ev.text})
                elif isinstance(ev, ImageStarted):
                    emit({"type": "image_started", "height": ev.height, "width": ev.width})
                elif isinstance(ev, ImageProgress):
                    emit({"type": "image_progress", "rows_done": ev.rows_done, "rows_total": ev.rows_total})
                elif isinstance(ev, ImageDone):
                    images.append((ev.codes, ev.image))
                elif isinstance(ev, Finished):
                    result = ev
            reused = prefix.reused
            self.stats["cache_hits" if reused else "cache_misses"] += 1
            seconds = time.perf_counter() - start
        meta = {"dropped_turns": dropped, "prompt_tokens": len(cond_ids), "generated_tokens": len(result.token_ids),
                "cached_tokens_reused": reused or 0, "seconds": round(seconds, 4), "seed": seed,
                "finish_reason": result.reason, "image_size": list(image_size), "model": self.name,
                "sampler": sampler_name}
        return {"ids": result.token_ids, "images": images, "reason": result.reason, "meta": meta}
