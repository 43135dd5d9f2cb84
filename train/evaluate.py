"""Evaluation of a world model (issue 5) and of the video decoder (issue 8) against the simulators they
were trained on (DESIGN "the simulator is also the ground truth"). Prints JSON metrics.

    python -m train.evaluate --task {explore,manipulate,guide,story,video} [--checkpoint DIR]
        [--scenario NAME_OR_CFG | --wad FILE --map MAP] [--episodes N] [--seed S] [--steps K]
        [--sampler ar|dida] [--dida-steps K] [--image-area PX] [--score-area PX] [--context C]
        [--sims vizdoom,crafter,pybullet] [--span N] [--doom-tics T] [--json]

Held-out by construction: episode seeds are `seed + HELDOUT_SEED_OFFSET` of each simulator, PyBullet uses
the held-out colour set, and ViZDoom runs the training scenarios (new seeds) unless --scenario / --wad
--map names another world (e.g. an unseen freedoom level). `--checkpoint` defaults to assets/demo; for
--task video it names a video decoder folder instead (default: worldsim.video.find_video_decoder()).

Images: engine frames are resized (bicubic, SPEC §4) to the model's image size (`--image-area`, the area
used in training) and every PSNR is computed there, on decoded pixels against those frames. With
`--score-area PX` (explore, manipulate) the figures are computed on frames of that area instead (sides
multiples of 8), the model's images resized to them: the way to compare checkpoints trained at different
areas or on tokenizers of different factors on the same pixels.

- explore (ViZDoom): teacher-forced next frame. The model sees the true history (the last `--context`
  frames as codes, each step's true narration) and generates the next image. `model_psnr` (the model),
  `baseline_psnr` (copy the last frame), `prev_tokens_psnr` (the last frame's decoded tokens),
  `tokenizer_psnr` (the true next frame's decoded tokens: the ceiling), `shuffled_instruction_psnr`
  (the same history with the last narration swapped for another action's), `teacher_forced_psnr` (each
  code the model's argmax given the true codes before it, one forward pass: the gap to `model_psnr` is
  what the model's own errors cost as generation runs on), `per_action` (those
  figures per action), `rollout_psnr` / `rollout_baseline_psnr` (an 8-step rollout fed its own frames,
  against copying the first frame).
- manipulate (PyBullet): per subtask, teacher-forced: the subtask text is generated after the true
  history (`subtask_exact_match` against the scripted plan), then the keyframe is generated after the
  true text; PSNR against the simulator's frame at the subtask's end, whole frame (`model_psnr`,
  `baseline_psnr` = the repeated first frame) and object + arm pixels from PyBullet's segmentation
  mask (`model_object_psnr`, `baseline_object_psnr`).
- guide (Crafter): the model answers "How to make X" for each target; `valid_fraction` = share of
  generated step lists valid in Crafter's tech tree that end by making X (train/sim/craft.valid_steps).
  `teacher_forced_valid`: the share of targets whose scripted answer in a held-out world the model
  reproduces token for token (text, image starts, the stop) when given the true keyframes and the text
  before each token: what it knows, apart from what its own images cost; `teacher_forced` per target.
- story (Crafter): the model tells the story of a held-out episode from its first frame; beats are
  compared with the episode's events: `event_recall` (true events told), `beat_precision` (told beats
  that happened), `agreement` (their F1), `valid_beat_fraction` (beats that are known event sentences).
- video (the video decoder; the world model is not loaded): `--episodes` continuous held-out clips per
  simulator in `--sims`, each `--span` frames long (default: the decoder's eval_span, else its training
  num_frames, from its video_decoder.json), ViZDoom clips at `--doom-tics` tics a frame (default: the
  decoder's doom_tics, else a world step: 1 with span 5 is one world step at the engine's 35 fps, the
  gap the renderer fills between two session images). The decoder in-betweens each clip from its first
  and last frame
  (train.video_decoder.evaluate_video): `model_psnr` (its in-between frames against the simulator's),
  `baseline_psnr` (the linear cross-fade of the two keyframes), `few_step_speedup` /
  `few_step_psnr_drop` (the few-step decoder against the many-step one), overall (pooled over all
  clips) and in `per_sim`. The clips are train/sim/clips.py's, held-out split: ViZDoom random walks,
  Crafter walks and the Panda arm carrying a cube (held-out seeds and colours); a clip cut by a death or
  restart is redrawn with the next seed (`redrawn_clips`).

Bad input (an unknown scenario, a wad without the map, a tokenizer whose codebook does not match the
model, --episodes 0, a missing checkpoint, a --task video checkpoint that is no video decoder, an unknown
--sims name) prints `error: ...` (and {"error": ...} with --json), exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from train.sim.clips import SIMS, video_clips

TASKS = ("explore", "manipulate", "guide", "story", "video")
SAMPLERS = ("ar", "dida")
DEFAULT_IMAGE_AREA = 96 * 96
SCORE_PATCH = 8  # --score-area frames: sides rounded to multiples of 8, the frames the factor-8 demo was scored on


# ------------------------------------------------------------------------------------ model side

class Evaluator:
    """The loaded checkpoint plus the helpers every task uses."""

    def __init__(self, checkpoint: str | None, sampler: str = "ar", dida_steps: int = 8,
                 image_area: int | None = None, seed: int = 0, temperature: float = 0.0,
                 score_area: int | None = None):
        from model.sampling import task_defaults
        from worldsim.runtime import DEFAULT_CHECKPOINT, Runtime

        path = checkpoint or DEFAULT_CHECKPOINT
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint: {path} is not a folder (no demo checkpoint shipped yet? pass --checkpoint)")
        self.rt = Runtime.load(path)  # ValueError when the vision tokenizer's codebook does not match
        # shipped weights are fp16; CPU matmuls in fp16 are slow and less exact, so evaluate in fp32
        self.model, self.vq = self.rt.model.float().eval(), self.rt.vq.float().eval()
        self.tok, self.vocab = self.rt.tokenizer, self.rt.vocab
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {list(SAMPLERS)}, got {sampler!r}")
        if sampler == "dida":
            from model.dida import DiDASampler

            self.sampler = DiDASampler(num_steps=dida_steps)
        else:
            self.sampler = None
        # the area the checkpoint was trained at (worldsim.json), else 96x96
        self.image_area = image_area or self.rt.native_image_area or DEFAULT_IMAGE_AREA
        self.patch = self.vq.config.downsample_factor
        if score_area is not None and (not isinstance(score_area, int) or score_area < SCORE_PATCH ** 2):
            raise ValueError(f"score_area: must be an integer of at least {SCORE_PATCH ** 2} px, got {score_area!r}")
        self.score_area = score_area
        self.params = task_defaults("explore").replace(guidance_scale=1.0, image_temperature=temperature,
                                                       text_temperature=temperature, max_new_tokens=4096)
        self.generator = torch.Generator().manual_seed(seed)

    # pixels <-> codes
    def resize(self, frame: np.ndarray) -> np.ndarray:
        return _fit(frame, self.image_area, self.patch)

    def truth(self, frame: np.ndarray, resized: np.ndarray) -> np.ndarray:
        """The engine frame a figure compares against: `resized` (the model's own input, self.resize), or
        with `score_area` one size for every checkpoint (sides multiples of SCORE_PATCH), so models trained
        at different areas or tokenizer factors compare on the same pixels."""
        return resized if self.score_area is None else _fit(frame, self.score_area, SCORE_PATCH)

    def pixels(self, codes, like: np.ndarray) -> np.ndarray:
        """Decoded codes at `like`'s size (bicubic when the sizes differ)."""
        from PIL import Image

        y = self.decode(codes)
        if y.shape[:2] == like.shape[:2]:
            return y
        return np.asarray(Image.fromarray(y).resize((like.shape[1], like.shape[0]), Image.Resampling.BICUBIC))

    def resize_mask(self, mask: np.ndarray, like: np.ndarray) -> np.ndarray:
        from PIL import Image

        m = Image.fromarray(mask.astype(np.uint8) * 255).resize((like.shape[1], like.shape[0]), Image.Resampling.NEAREST)
        return np.asarray(m) > 127

    @torch.no_grad()
    def encode(self, resized: np.ndarray) -> list[list[int]]:
        from model.vision_tokenizer import to_tensor

        return self.vq.encode(to_tensor(resized)[None].to(self.vq.quant_conv.weight.dtype))[0].tolist()

    @torch.no_grad()
    def decode(self, codes) -> np.ndarray:
        c = torch.as_tensor(codes, dtype=torch.long)[None]
        y = self.vq.decode(c)[0].float()
        return ((y + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()

    # sequences
    def prefix_ids(self, rec: dict) -> list[int]:
        """Ids of `rec` (codes images) up to the end of its answer segments, without <extra_101><EOS>."""
        from train.data.format import encode_record

        enc = encode_record(rec, self.tok, mode="sft", visual_weight=1.0)
        return enc.ids[:-2]

    def _check_room(self, ids, size):
        need = len(ids) + size[0] * size[1] + size[0] + 16
        if need > self.model.config.max_position_embeddings:
            raise ValueError(f"context: {need} tokens do not fit the model's {self.model.config.max_position_embeddings}; "
                             "lower --context or --image-area")

    @torch.no_grad()
    def next_image(self, ids: list[int], size: tuple[int, int]) -> list[list[int]]:
        from model.generate import ImageDone, generate

        self._check_room(ids, size)
        for ev in generate(self.model, ids, params=self.params, generator=self.generator, image_size=size,
                           start_with_image=True, min_images=1, max_images=1, image_sampler=self.sampler):
            if isinstance(ev, ImageDone):
                return ev.codes.tolist()
        raise RuntimeError("generation ended without an image")

    @torch.no_grad()
    def teacher_forced(self, ids: list[int], size: tuple[int, int]) -> list[list[int]]:
        """The model's argmax for each code of the image that ends `ids`, each given the true codes
        before it (one forward pass: no error of its own can compound)."""
        lo = self.vocab.visual(0)
        self._check_room(ids, (0, 0))
        pos = [p for p, t in enumerate(ids) if self.vocab.is_visual(t)][-size[0] * size[1]:]
        logits = self.model(torch.tensor([ids]), score=torch.tensor(pos) - 1,
                            vocab_range=(lo, lo + self.model.config.codebook_size))[0]
        return logits.argmax(-1).view(size).tolist()

    @torch.no_grad()
    def text_mistakes(self, rec: dict) -> list[tuple[str, str]]:
        """Teacher-forced text of `rec`'s answer (codes images): for every answer token outside its images
        (the text, each image's BOI, the closing <extra_101><EOS>), the model's argmax given the true tokens
        before it, in one forward pass. An image's header, codes, row ends and EOI are left out: generation
        forces its layout. Returns (expected, argmax) for each wrong one."""
        from train.data.format import encode_record

        enc = encode_record(rec, self.tok, mode="sft", visual_weight=1.0)
        self._check_room(enc.ids, (0, 0))
        pos, inside = [], False
        for p in range(enc.answer_span[0], len(enc.ids)):
            if not inside:
                pos.append(p)
            inside = (inside or enc.ids[p] == self.vocab.boi) and enc.ids[p] != self.vocab.eoi
        pred = self.model(torch.tensor([enc.ids]), score=torch.tensor(pos) - 1)[0].argmax(-1).tolist()
        return [(self.tok.decode([enc.ids[p]]), self.tok.decode([q])) for p, q in zip(pos, pred) if q != enc.ids[p]]

    @torch.no_grad()
    def next_text(self, ids: list[int], size: tuple[int, int], max_tokens: int = 48) -> str:
        """The text the model writes before its next image."""
        from model.generate import ImageStarted, TextDelta, generate

        self._check_room(ids, size)
        out = ""
        for ev in generate(self.model, ids, params=self.params, generator=self.generator, image_size=size,
                           min_images=1, max_images=1, max_text_tokens=max_tokens, tokenizer=self.tok,
                           image_sampler=self.sampler):
            if isinstance(ev, TextDelta):
                out += ev.text
            elif isinstance(ev, ImageStarted):
                break
        return out.strip()

    @torch.no_grad()
    def answer(self, ids: list[int], size: tuple[int, int], max_images: int, min_images: int = 1):
        """Free generation of an interleaved answer: [(text before image i, codes i), ...]."""
        from model.generate import Finished, ImageDone, TextDelta, generate

        self._check_room(ids, size)
        parts, text = [], ""
        for ev in generate(self.model, ids, params=self.params, generator=self.generator, image_size=size,
                           min_images=min_images, max_images=max_images, max_text_tokens=48,
                           tokenizer=self.tok, image_sampler=self.sampler):
            if isinstance(ev, TextDelta):
                text += ev.text
            elif isinstance(ev, ImageDone):
                parts.append((text.strip(), ev.codes.tolist()))
                text = ""
            elif isinstance(ev, Finished):
                break
        return parts


def _fit(frame: np.ndarray, area: int, patch: int) -> np.ndarray:
    from PIL import Image

    from model.vision_tokenizer import resize_to_area

    return np.asarray(resize_to_area(Image.fromarray(frame), area, patch))


def _codes(c) -> dict:
    return {"codes": c}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return round(float(np.mean(xs)), 3) if xs else None


# ------------------------------------------------------------------------------------ tasks

def explore(ev: Evaluator, world: dict | None, episodes: int, seed: int, steps: int, context: int,
            rollout: int = 8) -> dict:
    from train.data import format as fmt
    from train.sim import doom
    from train.sim.common import psnr

    worlds = [world] if world else [doom.resolve_world(s) for s in doom.TRAIN_SCENARIOS]
    rows, roll, roll_base = [], [], []
    for i in range(episodes):
        w = worlds[i % len(worlds)]
        rng = np.random.default_rng([seed + doom.HELDOUT_SEED_OFFSET, i])
        frames, actions = doom.episode(w, int(rng.integers(2 ** 31 - 1)), max(steps, rollout),
                                       warmup=int(rng.integers(0, 40)))
        resized = [ev.resize(f) for f in frames]
        codes = [ev.encode(r) for r in resized]
        small = [ev.truth(f, r) for f, r in zip(frames, resized)]
        size = (len(codes[0]), len(codes[0][0]))
        for k in range(1, steps + 1):
            lo = max(0, k - context)

            def record(last_narration, then=()):
                answer = []
                for j in range(lo + 1, k):
                    answer += [fmt.text(doom.NARRATION[actions[j - 1]]), {"image": _codes(codes[j])}]
                answer += [fmt.text(last_narration), *then]
                return fmt.record("explore", answer, "Explore this place.", [_codes(codes[lo])])

            a = actions[k - 1]
            pred = ev.pixels(ev.next_image(ev.prefix_ids(record(doom.NARRATION[a])), size), small[k])
            other = doom.ACTIONS[(doom.ACTIONS.index(a) + 1 + int(rng.integers(len(doom.ACTIONS) - 1))) % len(doom.ACTIONS)]
            shuf = ev.pixels(ev.next_image(ev.prefix_ids(record(doom.NARRATION[other])), size), small[k])
            forced = record(doom.NARRATION[a], [{"image": _codes(codes[k])}])
            tf = ev.pixels(ev.teacher_forced(ev.prefix_ids(forced), size), small[k])
            rows.append({"action": a, "model": psnr(small[k], pred), "baseline": psnr(small[k], small[k - 1]),
                         "teacher_forced": psnr(small[k], tf),
                         "prev_tokens": psnr(small[k], ev.pixels(codes[k - 1], small[k])),
                         "tokenizer": psnr(small[k], ev.pixels(codes[k], small[k])), "shuffled": psnr(small[k], shuf)})
        # rollout: the model's own frames as history
        own = [codes[0]]
        for k in range(1, rollout + 1):
            lo = max(0, k - context)
            answer = []
            for j in range(lo + 1, k):
                answer += [fmt.text(doom.NARRATION[actions[j - 1]]), {"image": _codes(own[j])}]
            answer.append(fmt.text(doom.NARRATION[actions[k - 1]]))
            rec = fmt.record("explore", answer, "Explore this place.", [_codes(own[lo])])
            own.append(ev.next_image(ev.prefix_ids(rec), size))
            roll.append(psnr(small[k], ev.pixels(own[k], small[k])))
            roll_base.append(psnr(small[k], small[0]))

    def summary(rs):
        return {"model_psnr": _mean(r["model"] for r in rs), "baseline_psnr": _mean(r["baseline"] for r in rs),
                "prev_tokens_psnr": _mean(r["prev_tokens"] for r in rs),
                "tokenizer_psnr": _mean(r["tokenizer"] for r in rs),
                "shuffled_instruction_psnr": _mean(r["shuffled"] for r in rs),
                "teacher_forced_psnr": _mean(r["teacher_forced"] for r in rs), "num_steps": len(rs)}

    out = summary(rows)
    out["per_action"] = {a: summary([r for r in rows if r["action"] == a]) for a in doom.ACTIONS
                         if any(r["action"] == a for r in rows)}
    out["rollout_psnr"], out["rollout_baseline_psnr"] = _mean(roll), _mean(roll_base)
    out["worlds"] = sorted({w["name"] for w in worlds[:episodes]})
    return out


def manipulate(ev: Evaluator, episodes: int, seed: int) -> dict:
    from train.data import format as fmt
    from train.sim import panda
    from train.sim.common import psnr

    whole, obj, bwhole, bobj, match, n_sub = [], [], [], [], 0, 0
    for i in range(episodes):
        rng = np.random.default_rng([seed + panda.HELDOUT_SEED_OFFSET, i])
        ep = panda.episode(panda.TASKS[i % len(panda.TASKS)], int(rng.integers(2 ** 31 - 1)), "heldout")
        resized = [ev.resize(f) for f in ep.frames]
        codes = [ev.encode(r) for r in resized]
        small = [ev.truth(f, r) for f, r in zip(ep.frames, resized)]
        masks = [ev.resize_mask(m, s) for m, s in zip(ep.masks, small)]
        size = (len(codes[0]), len(codes[0][0]))
        n = len(ep.subtasks)
        q = f"Robot Arm Type: {panda.ARM}. Instruction: {ep.goal}. Finish the task with {n} steps."
        for k in range(n):
            hist = [seg for j in range(k) for seg in (fmt.text(f"Current Step: {ep.subtasks[j]}"),
                                                      {"image": _codes(codes[j + 1])})]
            # text: the prefix ends after the previous keyframe (or the prompt); a dummy text segment is
            # needed for a non-empty answer, so build the ids up to the answer start by hand
            ids = ev.prefix_ids(fmt.record("vla", hist + [fmt.text("x")], q, [_codes(codes[0])]))
            x_len = len(ev.tok.encode("x", allow_special=False))
            said = ev.next_text(ids[:-x_len], size)
            match += said == f"Current Step: {ep.subtasks[k]}"
            n_sub += 1
            rec = fmt.record("vla", hist + [fmt.text(f"Current Step: {ep.subtasks[k]}")], q, [_codes(codes[0])])
            pred = ev.pixels(ev.next_image(ev.prefix_ids(rec), size), small[k + 1])
            whole.append(psnr(small[k + 1], pred))
            obj.append(psnr(small[k + 1], pred, masks[k + 1]))
            bwhole.append(psnr(small[k + 1], small[0]))
            bobj.append(psnr(small[k + 1], small[0], masks[k + 1]))
    return {"model_psnr": _mean(whole), "baseline_psnr": _mean(bwhole), "model_object_psnr": _mean(obj),
            "baseline_object_psnr": _mean(bobj), "subtask_exact_match": round(match / max(1, n_sub), 3),
            "num_subtasks": n_sub, "object_set": sorted(panda.HELDOUT_COLOURS)}


def guide(ev: Evaluator, episodes: int, seed: int) -> dict:
    from train.data import format as fmt
    from train.sim import craft

    targets = sorted(craft.PLANS)
    side = int(round(np.sqrt(ev.image_area) / ev.patch))
    size = (side, side)
    valid, examples = [], []
    for i in range(episodes):
        target = targets[i % len(targets)]
        ids = ev.prefix_ids(fmt.record("howto", [fmt.text("x")], craft.QUESTIONS[target]))
        ids = ids[:-len(ev.tok.encode("x", allow_special=False))]
        parts = ev.answer(ids, size, max_images=len(craft.PLANS["stone pickaxe"]) + 1)
        steps = [t for t, _ in parts]
        ok = craft.valid_steps(steps, target)
        valid.append(ok)
        if len(examples) < 4:
            examples.append({"target": target, "steps": steps, "valid": ok})
    # the same questions teacher-forced: each target's scripted walk in a held-out world, its true keyframes
    # given; a target counts when every token it chooses (text, image starts, the stop) is the model's argmax
    forced = {}
    for j, target in enumerate(targets):
        walk = craft.first_complete_howto(target, seed + craft.HELDOUT_SEED_OFFSET + 1000 * j)
        keyframes = [_codes(ev.encode(ev.resize(f))) for f in walk.frames[1:]]
        wrong = ev.text_mistakes(fmt.record("howto", craft.answer(walk.steps, keyframes), craft.QUESTIONS[target]))
        forced[target] = {"exact": not wrong, "first_mistake": wrong[0] if wrong else None}
    return {"valid_fraction": round(float(np.mean(valid)), 3), "num_lists": len(valid), "examples": examples,
            "teacher_forced_valid": round(float(np.mean([f["exact"] for f in forced.values()])), 3),
            "teacher_forced": forced}


def story(ev: Evaluator, episodes: int, seed: int) -> dict:
    from train.data import format as fmt
    from train.sim import craft

    rec_hits = rec_total = prec_hits = told = known = 0
    for i in range(episodes):
        rng = np.random.default_rng([seed + craft.HELDOUT_SEED_OFFSET, i])
        walk = craft.story(int(rng.integers(craft.HELDOUT_SEED_OFFSET)) + craft.HELDOUT_SEED_OFFSET)
        small = ev.resize(walk.frames[0])
        codes = ev.encode(small)
        size = (len(codes), len(codes[0]))
        ids = ev.prefix_ids(fmt.record("story", [fmt.text("x")], craft.STORY_PROMPT, [_codes(codes)]))
        ids = ids[:-len(ev.tok.encode("x", allow_special=False))]
        beats = [t for t, _ in ev.answer(ids, size, max_images=5)]
        events = set(walk.steps)
        rec_hits += len(events & set(beats))
        rec_total += len(events)
        prec_hits += sum(b in events for b in beats)
        known += sum(b in craft.EVENT_TEXT.values() for b in beats)
        told += len(beats)
    r = rec_hits / max(1, rec_total)
    p = prec_hits / max(1, told)
    return {"event_recall": round(r, 3), "beat_precision": round(p, 3),
            "agreement": round(2 * p * r / (p + r), 3) if p + r else 0.0,
            "valid_beat_fraction": round(known / max(1, told), 3), "num_beats": told, "num_events": rec_total}


# ------------------------------------------------------------------------------------ video decoder

def video_checkpoint(checkpoint: str | None) -> str:
    """The video decoder folder --task video evaluates: `checkpoint`, else what the engine would use."""
    from model.video_sampling import is_video_decoder
    from worldsim.video import find_video_decoder

    train_hint = "python -m train.video_decoder --recipe small_cpu --out runs/video"
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"checkpoint: {checkpoint} is not a folder")
        if not is_video_decoder(checkpoint):
            raise ValueError(f"checkpoint: {checkpoint} is not a video decoder folder (no video_decoder.json); "
                             "--task video takes one, e.g. RUN/checkpoints/step_N of train.video_decoder")
        return checkpoint
    found = find_video_decoder()
    if found is None:
        raise ValueError("checkpoint: no video decoder found (assets/video_decoder is not shipped and "
                         f"$WORLDSIM_VIDEO_DECODER is unset); pass --checkpoint DIR or train one: {train_hint}")
    return found


def video(checkpoint: str | None, world: dict | None, episodes: int, seed: int, sims=SIMS,
          span: int | None = None, doom_tics: int | None = None) -> dict:
    from model.video_sampling import load_settings
    from train.video_decoder import default_span, evaluate_video

    path = video_checkpoint(checkpoint)
    settings = load_settings(path)
    span = span or default_span(settings)
    doom_tics = doom_tics or settings.extra.get("doom_tics") or None
    if span < 3:
        raise ValueError(f"span: must be at least 3 (two keyframes and a frame between), got {span}")
    per_sim, shared = {}, {}
    for sim in sims:
        clips, facts = video_clips(sim, world, episodes, seed, span, doom_tics=doom_tics)  # held-out split
        r = evaluate_video(path, clips, span=span, max_clips=len(clips), seed=seed)
        shared = {k: r.pop(k) for k in ("few_steps", "many_steps", "span", "checkpoint", "teacher")}
        per_sim[sim] = {**r, **facts}
    n = sum(r["num_clips"] for r in per_sim.values())

    def pooled(key):  # clip-weighted mean of per-simulator means = the mean over all clips
        return round(sum(r[key] * r["num_clips"] for r in per_sim.values()) / n, 3)

    few_s, many_s = (sum(r[k] for r in per_sim.values()) for k in ("few_step_seconds", "many_step_seconds"))
    return {"model_psnr": pooled("model_psnr"), "baseline_psnr": pooled("baseline_psnr"),
            "few_step_speedup": round(many_s / max(few_s, 1e-9), 3),
            "few_step_psnr_drop": round(pooled("many_step_psnr") - pooled("few_step_psnr"), 3),
            "few_step_psnr": pooled("few_step_psnr"), "many_step_psnr": pooled("many_step_psnr"),
            "num_clips": n, **shared, "per_sim": per_sim}


def parse_sims(text: str) -> tuple[str, ...]:
    sims = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sims if s not in SIMS]
    if bad or not sims:
        raise ValueError(f"sims: must be a comma-separated list of {list(SIMS)}, got {text!r}")
    return tuple(dict.fromkeys(sims))


# ------------------------------------------------------------------------------------ CLI

def run(task: str, checkpoint: str | None = None, scenario: str | None = None, wad: str | None = None,
        map_name: str | None = None, episodes: int = 4, seed: int = 0, steps: int = 8, context: int = 3,
        sampler: str = "ar", dida_steps: int = 8, image_area: int | None = None, rollout: int = 8,
        sims: str = ",".join(SIMS), span: int | None = None, doom_tics: int | None = None,
        score_area: int | None = None) -> dict:
    from train.sim.common import check_episodes

    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    check_episodes(episodes)
    for name, v in (("steps", steps), ("context", context), ("dida_steps", dida_steps), ("rollout", rollout)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if task != "video" and (span or doom_tics):
        raise ValueError("span/doom_tics: only for --task video")
    if score_area is not None and task not in ("explore", "manipulate"):
        raise ValueError("score_area: only for --task explore or manipulate")
    world = None
    if scenario or wad or map_name:
        if task not in ("explore", "video"):
            raise ValueError("scenario/wad/map: only for --task explore or video")
        from train.sim import doom

        world = doom.resolve_world(scenario, wad, map_name)  # checked before the model loads
    if task == "video":
        out = video(checkpoint, world, episodes, seed, parse_sims(sims), span, doom_tics)
        return {"task": task, "episodes": episodes, "seed": seed, **out}
    ev = Evaluator(checkpoint, sampler, dida_steps, image_area, seed, score_area=score_area)
    if task == "explore":
        out = explore(ev, world, episodes, seed, steps, context, rollout)
    elif task == "manipulate":
        out = manipulate(ev, episodes, seed)
    elif task == "guide":
        out = guide(ev, episodes, seed)
    else:
        out = story(ev, episodes, seed)
    return {"task": task, "checkpoint": ev.rt.name, "sampler": sampler, "episodes": episodes, "seed": seed, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint")
    p.add_argument("--scenario")
    p.add_argument("--wad")
    p.add_argument("--map", dest="map_name")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="explore: teacher-forced steps per episode")
    p.add_argument("--context", type=int, default=3, help="explore: frames of history the model sees")
    p.add_argument("--rollout", type=int, default=8)
    p.add_argument("--sampler", default="ar", choices=SAMPLERS)
    p.add_argument("--dida-steps", type=int, default=8)
    p.add_argument("--image-area", type=int,
                   help=f"px per image (default: the checkpoint's training area, worldsim.json, else {DEFAULT_IMAGE_AREA})")
    p.add_argument("--score-area", type=int,
                   help="explore/manipulate: compare every figure on frames of this many px, whatever the model's area "
                        "(predictions resized bicubic), so checkpoints of different areas or tokenizers compare")
    p.add_argument("--sims", default=",".join(SIMS), help="video: simulators to draw clips from")
    p.add_argument("--span", type=int, help="video: frames from keyframe to keyframe (default: the decoder's)")
    p.add_argument("--doom-tics", type=int, help="video: tics a ViZDoom frame (default: the decoder's, else 4)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print compact JSON (default: indented)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        out = run(a.task, a.checkpoint, a.scenario, a.wad, a.map_name, a.episodes, a.seed, a.steps, a.context,
                  a.sampler, a.dida_steps, a.image_area, a.rollout, a.sims, a.span, a.doom_tics, a.score_area)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
