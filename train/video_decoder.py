"""Trainer of the video decoder (SPEC §6, paper §2.4 and §5.2 "Video Decoder"): flow matching on continuous
clips, then step distillation of the many-step teacher into a few-step student; and its evaluation.

    python -m train.video_decoder --recipe small_cpu --out runs/video-small-x0      # synthetic clips
    python -m train.video_decoder --recipe small_cpu --clips DIR [DIR ...] --out runs/video
    python -m train.video_decoder --resume runs/video-small-x0 --steps 6000
    python -m train.video_decoder --recipe distill_cpu --out runs/video-small-x0-distill \
        --distill-from runs/video-small-x0/checkpoints/step_002000
    python -m train.video_decoder --make-clips runs/video-heldout --num 32 --num-frames 8 --size 64 --seed 1
    python -m train.video_decoder --eval --checkpoint CKPT --clips DIR [--teacher CKPT] [--threads 1] [--json]

Clip folders (`--clips`): every folder under the given ones that holds at least `min_clip_frames` PNG (or
JPEG) files is one clip; its frames, sorted by file name, are consecutive frames at the clip's own rate
(any size: each is resized to the decoder's frame size). An optional `text.txt` beside them is the clip's
inter-frame text. The simulator writers' `out_dir/frames/{episode}/{k:03d}.png` is such a layout
(`--clips out_dir/frames`). Without `--clips` the trainer draws synthetic continuous trajectories
(`synthetic_clip`: a textured background under a camera pan, and coloured shapes moving and turning at
constant speed), generated on the fly from (seed, step).

A training example (per clip of the batch, seeded by (seed, step) so a resumed run sees what the
uninterrupted one would): a window of n frames (min_span <= n <= num_frames, the rest of the
num_frames is padding without loss); keyframes at its first and last frame, plus one inside with
probability `mid_keyframe_prob`; every keyframe's tokens are given (IBQ quantized embeddings, the mask).
Which keyframes are also written in noise-free: the FIRST one with probability `clean_first_prob` (the
paper's "randomly replace the first keyframe latent with clean image tokens"), each other one with
probability `clean_other_prob` (our addition: rendering knows every keyframe's pixels and writes them
all in, so that case must be in the training distribution); a keyframe not written in is generated from
its tokens like the in-between frames. Text is given with probability `text_prob`. The loss is the
MSE over the frames that are neither clean nor padding, of the predicted clean frames by default
(`loss_space="x0"`, i.e. the velocity error times sigma^2): the velocity loss weights a clip by 1/sigma^2, up
to 400x at low noise where x_t already shows where everything is, and starved the high-noise steps
that decide where objects go (the first run, with it, learned nothing beyond the cross-fade prior in
2,000 steps). The noise level sigma is shift(logit-normal) (SD3's sampling, with the sampler's shift).

Distillation (`distill_from`): the student starts as the teacher. For a student step i of
`student_steps` (sigma_i -> sigma_i+1 on the shifted grid), the target is where the teacher lands after
its own teacher_steps/student_steps Euler steps from the same noisy clip; the student learns the single
velocity that gets there: (x_teacher - x_i) / (sigma_i+1 - sigma_i). The grids share their points (see
model/video_sampling.py).

Checkpoints (train/common.py layout): each `checkpoints/step_N/` is a video decoder folder
(`load_video_decoder` reads it: weights are the EMA when `ema_decay` > 0) plus trainer_state.pt (raw
weights, optimizer, step) and train_config.json. One process (no torchrun/FSDP: the model is small).

The IBQ: `ibq` names a load_ibq folder (the world model's tokenizer, so the decoder reads the same
embeddings it writes); empty means a RANDOM `ibq_preset(ibq_preset)` tokenizer seeded by `seed` - a
fixed random feature map, fine for a first run on synthetic clips, and saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from train import common

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class VideoTrainConfig:
    out_dir: str = "runs/video"
    clips: tuple[str, ...] = ()  # clip folders; () = synthetic clips
    preset: str = "small"  # model.video_decoder.video_decoder_preset name
    sigma_data: float = 0.0  # the decoder's EDM preconditioning (model/video_decoder.py); 0 = off
    motion_prior: bool = False  # the decoder's gated motion-compensated prior (model/video_decoder.py)
    ibq: str = ""  # a load_ibq folder; "" = random ibq_preset(ibq_preset) seeded by `seed`
    ibq_preset: str = "debug"
    frame_size: tuple[int, int] = (64, 64)
    num_frames: int = 12  # frames per example (a multiple of 4), keyframes included
    min_span: int = 5  # fewest frames from first to last keyframe
    mid_keyframe_prob: float = 0.25
    clean_first_prob: float = 0.5
    clean_other_prob: float = 0.75
    text_prob: float = 0.5
    text_bytes: int = 64
    min_clip_frames: int = 5
    max_stride: int = 2  # clip frames: every 1st .. every max_stride-th frame (speed augmentation)
    # recorded in the checkpoint for train.evaluate --task video (which otherwise in-betweens num_frames
    # frames of clips at one world step a frame):
    eval_span: int = 0  # frames from keyframe to keyframe to evaluate (0: num_frames)
    doom_tics: int = 0  # tics a frame of the ViZDoom clips (train.sim.clips --doom-tics; 0: a world step)
    batch_size: int = 8
    steps: int = 3000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    shift: float = 3.0
    loss_space: str = "x0"  # "x0": ||x0_hat - x0||^2 (= sigma^2 * velocity error); "velocity": ||v_hat - v||^2
    sample_steps: int = 32  # steps the saved decoder samples with (the teacher's count)
    # step distillation
    distill_from: str | None = None  # a teacher video decoder folder: this run distills it
    student_steps: int = 4
    teacher_steps: int = 32
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = torch's default (on a shared, busy CPU 1 can be several times faster)
    resume: bool = True
    progress: bool = True


def debug_cpu() -> VideoTrainConfig:
    """Tests: the debug model on 32 px clips of 8 frames."""
    return VideoTrainConfig(out_dir="runs/video-debug", preset="debug", frame_size=(32, 32), num_frames=8,
                            min_span=4, batch_size=2, steps=20, warmup_steps=2, save_every=10, log_every=1,
                            sample_steps=8, teacher_steps=8, student_steps=2)


def small_cpu() -> VideoTrainConfig:
    """The first CPU run: the `small` model (hidden 192, 4 blocks) on 64 px synthetic clips of up to 8 frames,
    one thread (on the shared 2-core machines two threads ran 5x slower under load)."""
    return VideoTrainConfig(out_dir="runs/video-small", num_frames=8, steps=2000, save_every=200, threads=1)


def distill_cpu() -> VideoTrainConfig:
    """Distil a small_cpu teacher (32 steps) into 4 steps; give --distill-from."""
    return VideoTrainConfig(out_dir="runs/video-small-distill", num_frames=8, steps=400, lr=5e-5, min_lr=5e-6,
                            warmup_steps=20, ema_decay=0.99, batch_size=4, save_every=100, sample_steps=4,
                            threads=1)


RECIPES = {f.__name__: f for f in (debug_cpu, small_cpu, distill_cpu)}


# ------------------------------------------------------------------------------------ synthetic clips

_COLOURS = [((220, 40, 40), "red"), ((40, 170, 60), "green"), ((40, 80, 220), "blue"), ((235, 200, 30), "yellow"),
            ((230, 120, 20), "orange"), ((150, 50, 190), "purple"), ((240, 240, 240), "white"), ((20, 20, 20), "black")]
_SHAPES = ("circle", "square", "triangle")


def _direction(vx: float, vy: float) -> str:
    if abs(vx) < 0.3 and abs(vy) < 0.3:
        return "stays"
    return "moves " + ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else "moves " + ("down" if vy > 0 else "up")


def synthetic_clip(rng: np.random.Generator, num_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """A continuous trajectory: (num_frames, H, W, 3) uint8 and its text. A blurred random background twice
    the frame size is seen through a window panning at constant speed; 1-3 shapes move and turn at constant
    speed over it. Drawn at 2x and downsampled, so motion is smooth below a pixel."""
    from PIL import Image, ImageDraw, ImageFilter

    H, W = size
    s = 2  # supersampling
    bg = Image.new("RGB", (W * 2 * s, H * 2 * s), tuple(int(c) for c in rng.integers(60, 200, 3)))
    d = ImageDraw.Draw(bg)
    for _ in range(24):
        x0, y0 = rng.integers(0, W * 2 * s), rng.integers(0, H * 2 * s)
        w, h = rng.integers(4 * s, W * s // 2), rng.integers(4 * s, H * s // 2)
        fill = tuple(int(c) for c in rng.integers(30, 230, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    bg = bg.filter(ImageFilter.GaussianBlur(1.5 * s))
    pan = rng.uniform(-1.5, 1.5, 2) * s  # px per frame (in supersampled px)
    start = np.array([W * s / 2, H * s / 2]) - pan * (num_frames - 1) / 2  # keeps the window inside
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        colour, cname = _COLOURS[int(rng.integers(len(_COLOURS)))]
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        r = rng.uniform(0.08, 0.18) * min(H, W) * s
        v = rng.uniform(-2.5, 2.5, 2) * s
        mid = rng.uniform(0.25, 0.75, 2) * np.array([W * s, H * s])
        objects.append(dict(shape=shape, colour=colour, name=cname, r=r, v=v,
                            p0=mid - v * (num_frames - 1) / 2, a0=rng.uniform(0, 2 * np.pi),
                            w=rng.uniform(-0.15, 0.15)))
    frames = []
    for k in range(num_frames):
        ox, oy = start + pan * k
        im = bg.crop((int(round(ox)), int(round(oy)), int(round(ox)) + W * s, int(round(oy)) + H * s))
        # sub-pixel pan: crop at integer offsets of the 2x canvas, i.e. half-pixel steps in the frame
        d = ImageDraw.Draw(im)
        for o in objects:
            cx, cy = o["p0"] + o["v"] * k
            a, r = o["a0"] + o["w"] * k, o["r"]
            if o["shape"] == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o["colour"])
            else:
                n = 4 if o["shape"] == "square" else 3
                pts = [(cx + r * math.cos(a + 2 * math.pi * i / n), cy + r * math.sin(a + 2 * math.pi * i / n))
                       for i in range(n)]
                d.polygon(pts, fill=o["colour"])
        frames.append(np.asarray(im.resize((W, H), Image.Resampling.LANCZOS)))
    pan_word = _direction(pan[0], pan[1]).replace("moves", "the camera pans").replace("stays", "the camera holds")
    article = {o["name"]: "an" if o["name"][0] in "aeiou" else "a" for o in objects}
    text = "; ".join([pan_word] + [f"{article[o['name']]} {o['name']} {o['shape']} {_direction(*o['v'])}"
                                   for o in objects])
    return np.stack(frames), text


def write_synthetic_clips(out_dir: str, num: int, num_frames: int, size: tuple[int, int], seed: int) -> list[str]:
    """`num` synthetic clips in the clip-folder layout (out_dir/clip_NNNN/NNN.png + text.txt)."""
    from PIL import Image

    paths = []
    for i in range(num):
        frames, text = synthetic_clip(np.random.default_rng([seed, 7919, i]), num_frames, size)
        folder = os.path.join(out_dir, f"clip_{i:04d}")
        os.makedirs(folder, exist_ok=True)
        for k, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(folder, f"{k:03d}.png"))
        with open(os.path.join(folder, "text.txt"), "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        paths.append(folder)
    return paths


# ------------------------------------------------------------------------------------ clip folders

def find_clip_folders(roots, min_frames: int) -> list[str]:
    out = []
    for root in roots:
        if not os.path.isdir(root):
            raise ValueError(f"clips: {root} is not a folder")
        for folder, _, names in os.walk(root):
            if sum(n.lower().endswith(FRAME_EXTENSIONS) for n in names) >= min_frames:
                out.append(folder)
    if not out:
        raise ValueError(f"clips: no folder with at least {min_frames} frames ({', '.join(FRAME_EXTENSIONS)}) "
                         f"under {list(roots)}")
    return sorted(out)


def load_clip(folder: str, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """(F, H, W, 3) uint8 at `size` and the clip's text (None without text.txt)."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS))
    frames = []
    for n in names:
        with Image.open(os.path.join(folder, n)) as im:
            frames.append(np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.Resampling.LANCZOS)))
    text_file = os.path.join(folder, "text.txt")
    text = open(text_file, encoding="utf-8").read().strip() if os.path.isfile(text_file) else None
    return np.stack(frames), text or None


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------ batches

@dataclass
class Batch:
    x0: torch.Tensor  # (B, 3, F, H, W)
    cond: object  # model.video_sampling.Conditions
    weight: torch.Tensor  # (B, F) 1 where the loss counts


def make_batch(cfg: VideoTrainConfig, step: int, ibq, clips: list | None) -> Batch:
    """Step `step`'s batch, a function of (seed, step) only (see the module docstring)."""
    from model.video_sampling import build_conditions

    g = np.random.default_rng([cfg.seed, step])
    Fn, (H, W) = cfg.num_frames, cfg.frame_size
    videos, keys, indices, texts, clean, weight = [], [], [], [], [], torch.zeros(cfg.batch_size, Fn)
    for b in range(cfg.batch_size):
        n = int(g.integers(cfg.min_span, Fn + 1))
        if clips is None:
            frames, text = synthetic_clip(g, n, (H, W))
        else:
            all_frames, text = clips[int(g.integers(len(clips)))]
            n = min(n, len(all_frames))
            stride = int(g.integers(1, min(cfg.max_stride, (len(all_frames) - 1) // (n - 1)) + 1))
            s0 = int(g.integers(0, len(all_frames) - (n - 1) * stride))
            frames = all_frames[s0:s0 + (n - 1) * stride + 1:stride]
        video = torch.zeros(3, Fn, H, W)
        video[:, :n] = to_unit(frames)
        ix = [0, n - 1]
        if n > 2 and g.random() < cfg.mid_keyframe_prob:
            ix.insert(1, int(g.integers(1, n - 1)))
        flags = [bool(g.random() < cfg.clean_first_prob)] + [bool(g.random() < cfg.clean_other_prob) for _ in ix[1:]]
        use_text = text is not None and g.random() < cfg.text_prob
        videos.append(video)
        keys.append(video[:, ix].permute(1, 0, 2, 3))  # (S, 3, H, W)
        indices.append(ix)
        texts.append([text if use_text else None] * (len(ix) - 1))
        clean.append(flags)
        weight[b, :n] = 1.0
    cond = build_conditions(keys, indices, Fn, ibq, texts, cfg.text_bytes, clean)
    weight = weight * (1.0 - cond.clean)  # clean frames are given, not learned
    return Batch(torch.stack(videos), cond, weight)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """x_sigma = sigma*noise + (1-sigma)*x0 (sigma (B,)), clean frames written in."""
    from model.video_sampling import write_back

    s = sigma[:, None, None, None, None]
    return write_back(s * noise + (1 - s) * x0, cond)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the frames with weight 1 (B, F); sample_weight (B,) scales each clip's terms."""
    w = weight[:, None, :, None, None]  # (B, 1, F, 1, 1)
    sq = (pred.float() - target) ** 2 * w
    if sample_weight is not None:
        sq = sq * sample_weight[:, None, None, None, None]
    return sq.sum() / (w.sum() * pred.shape[1] * pred.shape[3] * pred.shape[4]).clamp(min=1)


# ------------------------------------------------------------------------------------ training

def _load_clips(cfg: VideoTrainConfig) -> list | None:
    if not cfg.clips:
        return None
    return [load_clip(f, cfg.frame_size) for f in find_clip_folders(cfg.clips, cfg.min_clip_frames)]


def _check(cfg: VideoTrainConfig) -> None:
    if cfg.num_frames % 4 or cfg.num_frames < 4:
        raise ValueError(f"num_frames: must be a positive multiple of 4, got {cfg.num_frames}")
    if cfg.eval_span and not 3 <= cfg.eval_span:
        raise ValueError(f"eval_span: must be 0 (num_frames) or at least 3, got {cfg.eval_span}")
    if not 2 <= cfg.min_span <= cfg.num_frames:
        raise ValueError(f"min_span: must be in [2, num_frames={cfg.num_frames}], got {cfg.min_span}")
    if cfg.loss_space not in ("x0", "velocity"):
        raise ValueError(f"loss_space: must be 'x0' or 'velocity', got {cfg.loss_space!r}")
    if cfg.teacher_steps % cfg.student_steps:
        raise ValueError(f"teacher_steps: must be a multiple of student_steps={cfg.student_steps}, "
                         f"got {cfg.teacher_steps}")


def main(cfg: VideoTrainConfig) -> list[dict]:
    from model.video_decoder import MIN_SIGMA, VideoDecoder, video_decoder_preset
    from model.video_sampling import (DecoderSettings, euler_segment, load_video_decoder, make_scheduler,
                                      save_video_decoder, set_schedule, shifted)
    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq

    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    resume_dir = common.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    teacher = None
    if resume_dir:
        model, ibq, _ = load_video_decoder(resume_dir)
    elif cfg.distill_from:
        model, ibq, _ = load_video_decoder(cfg.distill_from)
    else:
        if cfg.ibq:
            ibq = load_ibq(cfg.ibq)
        else:
            torch.manual_seed(cfg.seed)
            ibq = IBQ(ibq_preset(cfg.ibq_preset)).eval()
        model = VideoDecoder(**video_decoder_preset(cfg.preset, ibq.config.embed_dim), sigma_data=cfg.sigma_data,
                             motion_prior=cfg.motion_prior)
    if cfg.distill_from:
        teacher = load_video_decoder(cfg.distill_from, device)[0].requires_grad_(False)
    state = common.load_state(resume_dir) if resume_dir else None
    ema = None
    if cfg.ema_decay > 0:
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}  # folder weights = EMA
    if state:
        model.load_state_dict(state["model"])
    model.to(device).train()
    ibq.to(device).eval().requires_grad_(False)
    opt = common.make_optimizer(model.named_parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    schedule = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    common.check_schedule(**schedule)
    log = common.RunLog(cfg.out_dir)
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log.truncate_after(start)
        print(f"[video] resuming from {resume_dir} at step {start}")
    else:
        log.truncate_after(0)
    if start >= cfg.steps:
        return []
    clips = _load_clips(cfg)
    if teacher is not None:
        sched = make_scheduler(cfg.shift)
        grid = set_schedule(sched, cfg.teacher_steps).to(device)  # (teacher_steps + 1,) shifted, ends at 0
        m = cfg.teacher_steps // cfg.student_steps

    def step_fn(step: int) -> dict:
        batch = make_batch(cfg, step, ibq, clips)
        x0, cond, w = batch.x0.to(device), batch.cond, batch.weight.to(device)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g).to(device)
        B = x0.shape[0]
        if teacher is None:
            u = torch.sigmoid(torch.randn(B, generator=g)).to(device)  # logit-normal
            sigma = shifted(u, cfg.shift)
            x = noisy(x0, noise, sigma, cond)
            target = noise - x0
        else:
            i = torch.randint(0, cfg.student_steps, (B,), generator=g).to(device)
            path = torch.stack([grid[i * m + j] for j in range(m + 1)], dim=1)  # (B, m + 1)
            sigma = path[:, 0]
            x = noisy(x0, noise, sigma, cond)
            with torch.no_grad():
                landed = euler_segment(teacher, x, path, cond)
            target = (landed - x) / (path[:, -1] - sigma)[:, None, None, None, None]
        pred = model(x, sigma * 1000.0, **cond.model_kwargs(model))
        scale = None
        if teacher is None and cfg.loss_space == "x0":
            scale = sigma.clamp(min=MIN_SIGMA) ** 2  # the model's own sigma floor: exactly the x0 error
        loss = masked_mse(pred, target, w, scale)
        loss.backward()
        grad_norm = common.clip_grad_norm(model.parameters(), cfg.grad_clip)
        lr = common.cosine_lr(step - 1, **schedule)
        common.set_lr(opt, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": round(grad_norm, 4)}

    def save_fn(step: int) -> None:
        def write_model(path):
            out = model
            if ema is not None:
                out = VideoDecoder.from_config(model.config)
                out.load_state_dict(ema)
            extra = {"step": step, "clips": list(cfg.clips) or "synthetic", "num_frames": cfg.num_frames,
                     "preset": cfg.preset, "eval_span": cfg.eval_span or cfg.num_frames,
                     "doom_tics": cfg.doom_tics or None}
            distilled = cfg.distill_from is not None
            settings = DecoderSettings(
                frame_size=tuple(cfg.frame_size), num_steps=cfg.student_steps if distilled else cfg.sample_steps,
                shift=cfg.shift, text_bytes=cfg.text_bytes, teacher_steps=cfg.teacher_steps if distilled else None,
                teacher=os.path.abspath(cfg.distill_from) if distilled else None, extra=extra)
            save_video_decoder(path, out, ibq, settings)

        st = {"step": step, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "optimizer": opt.state_dict()}
        common.write_checkpoint(cfg.out_dir, step, cfg, st, write_model, keep=cfg.keep_checkpoints)
        log.plot("video decoder" + (" (distillation)" if teacher is not None else ""))

    return common.run_steps(start_step=start, total_steps=cfg.steps, step_fn=step_fn, log=log, save_fn=save_fn,
                            save_every=cfg.save_every, log_every=cfg.log_every, progress=cfg.progress,
                            desc="video-distill" if teacher is not None else "video")


# ------------------------------------------------------------------------------------ evaluation

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays (pooled MSE)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def crossfade(first: np.ndarray, last: np.ndarray, n: int) -> np.ndarray:
    """Linear cross-fade baseline: (n, H, W, 3) uint8 from `first` to `last`."""
    a = np.linspace(0.0, 1.0, n)[:, None, None, None]
    return np.round((1 - a) * first[None].astype(np.float64) + a * last[None].astype(np.float64)).astype(np.uint8)


def default_span(settings) -> int:
    """The keyframe distance a decoder is evaluated at: its recorded eval_span, else its training num_frames."""
    return int(settings.extra.get("eval_span") or settings.extra.get("num_frames", 12))


@torch.no_grad()
def evaluate_video(checkpoint: str, clips, *, span: int | None = None, max_clips: int = 32, few_steps: int = 4,
                   teacher: str | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Held-out in-betweening quality of a video decoder folder.

    clips: clip folders (see the module docstring) or a list of (F, H, W, 3) uint8 arrays at any size.
    For each clip (at most `max_clips`), its first `span` frames (default: `default_span`; shorter
    clips use all their frames) are decoded from the first and last frame as
    keyframes, both given clean with their tokens, and the in-between frames are compared with the real
    ones at the decoder's frame size.

    model_psnr: the decoder at its own step count (video_decoder.json num_steps); baseline_psnr: the
    linear cross-fade of the two keyframes; few_step_*: the few-step decoder (this one when distilled,
    else this one at `few_steps`) against the many-step one (the distilled decoder's teacher - `teacher`,
    else the folder its video_decoder.json names, else this one at teacher_steps or 32 steps), speedup as
    wall-clock ratio of their sampling (few_step_seconds / many_step_seconds: the totals over clips, so
    callers can pool several calls) and the PSNR they lose. PSNR values are means over clips.
    """
    from model.video_sampling import build_conditions, load_video_decoder, sample_video

    model, ibq, settings = load_video_decoder(checkpoint, device)
    H, W = settings.frame_size
    folders = isinstance(clips, (str, os.PathLike)) or (isinstance(clips, (list, tuple)) and clips
                                                         and isinstance(clips[0], (str, os.PathLike)))
    if folders:
        roots = [clips] if isinstance(clips, (str, os.PathLike)) else list(clips)
        arrays = [load_clip(f, (H, W))[0] for f in find_clip_folders(roots, 3)[:max_clips]]
    else:
        from PIL import Image

        arrays = [np.stack([np.asarray(Image.fromarray(f).resize((W, H), Image.Resampling.LANCZOS)) for f in c])
                  for c in list(clips)[:max_clips]]
    if not arrays:
        raise ValueError("clips: none given")
    span = span or default_span(settings)
    distilled = settings.teacher_steps is not None
    teacher_dir = teacher or (settings.teacher if distilled and settings.teacher and os.path.isdir(settings.teacher)
                              else None)
    many_model, many_steps = model, settings.teacher_steps or max(settings.num_steps, 32)
    if teacher_dir:
        many_model, _, t_settings = load_video_decoder(teacher_dir, device)
        many_steps = settings.teacher_steps or t_settings.num_steps
    few_model, few_n = model, settings.num_steps if distilled else few_steps
    runs = {"model": (model, settings.num_steps), "few": (few_model, few_n), "many": (many_model, many_steps)}
    scores = {k: [] for k in (*runs, "baseline")}
    times = {k: 0.0 for k in runs}
    for c, frames in enumerate(arrays):
        n = min(span, len(frames))
        clip = frames[:n]
        keys = to_unit(clip[[0, n - 1]]).permute(1, 0, 2, 3)[None].to(device)  # (1, 2, 3, H, W)
        cond = build_conditions(keys, [[0, n - 1]], n, ibq)
        truth = clip[1:n - 1]
        scores["baseline"].append(psnr(crossfade(clip[0], clip[n - 1], n)[1:n - 1], truth))
        done = {}
        for name, (m, steps) in runs.items():
            key = (id(m), steps)
            if key not in done:
                t0 = time.perf_counter()
                video = sample_video(m, cond, num_steps=steps, shift=settings.shift,
                                     generator=torch.Generator().manual_seed(seed * 100_003 + c))
                done[key] = (to_uint8(video[0])[1:n - 1], time.perf_counter() - t0)
            out, dt = done[key]
            times[name] += dt
            scores[name].append(psnr(out, truth))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    return {"model_psnr": round(mean["model"], 3), "baseline_psnr": round(mean["baseline"], 3),
            "few_step_speedup": round(times["many"] / max(times["few"], 1e-9), 3),
            "few_step_psnr_drop": round(mean["many"] - mean["few"], 3),
            "few_step_psnr": round(mean["few"], 3), "many_step_psnr": round(mean["many"], 3),
            "few_step_seconds": round(times["few"], 3), "many_step_seconds": round(times["many"], 3),
            "few_steps": few_n, "many_steps": many_steps, "num_clips": len(arrays), "span": span,
            "checkpoint": checkpoint, "teacher": teacher_dir or "self"}


# ------------------------------------------------------------------------------------ CLI

def cli(argv):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="small_cpu", choices=sorted(RECIPES))
    p.add_argument("--resume", metavar="RUN_DIR")
    p.add_argument("--clips", nargs="+")
    p.add_argument("--out")
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--distill-from")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--eval", action="store_true", help="evaluate --checkpoint on --clips")
    p.add_argument("--checkpoint")
    p.add_argument("--teacher")
    p.add_argument("--max-clips", type=int, default=32)
    p.add_argument("--span", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="--eval: torch threads (0: torch's default)")
    p.add_argument("--make-clips", metavar="DIR", help="write synthetic clips to DIR and exit")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.make_clips:
        return "make", a
    if a.eval:
        if not (a.checkpoint and a.clips):
            p.error("--eval needs --checkpoint and --clips")
        return "eval", a
    cfg = common.load_config(VideoTrainConfig, a.resume) if a.resume else RECIPES[a.recipe]()
    if a.resume:
        cfg = dataclasses.replace(cfg, out_dir=a.resume, resume=True)
    for name, value in (("clips", tuple(a.clips) if a.clips else None), ("out_dir", a.out), ("steps", a.steps),
                        ("device", a.device), ("distill_from", a.distill_from)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    return "train", common.apply_overrides(cfg, a.set)


if __name__ == "__main__":
    kind, arg = cli(sys.argv[1:])
    if kind == "make":
        paths = write_synthetic_clips(arg.make_clips, arg.num, arg.num_frames, (arg.size, arg.size), arg.seed)
        print(json.dumps({"clips": len(paths), "out": arg.make_clips}))
    elif kind == "eval":
        if arg.threads:
            torch.set_num_threads(arg.threads)
        result = evaluate_video(arg.checkpoint, arg.clips, span=arg.span, max_clips=arg.max_clips,
                                teacher=arg.teacher, device=arg.device or "cpu")
        print(json.dumps(result) if arg.json else json.dumps(result, indent=2))
    else:
        main(arg)
