"""Sampling the video decoder (model/video_decoder.py) by flow matching, its conditions, and its folder.

Flow matching (rectified flow, SD3 / Wan convention, which diffusers' FlowMatchEulerDiscreteScheduler
implements): x_sigma = sigma * noise + (1 - sigma) * data, sigma in [0, 1], timestep = 1000 * sigma; the
model predicts the velocity v = noise - data, and an Euler step is x <- x + (sigma_next - sigma) * v.

The sampler uses `FlowMatchEulerDiscreteScheduler` with a timestep `shift` (sigma' = s*sigma / (1 + (s-1)*sigma),
more steps at high noise). Its schedule is given as base sigmas linspace(1, 1/n, n) (the scheduler shifts
them and appends the terminal 0): with the scheduler's own default grid the last of few steps would be
spent going from sigma 0.001 to 0. Grids of n and m*n steps share every n-step point, which the step
distillation relies on (train/video_decoder.py).

Given frames are written back after EVERY step (NOTES "Keyframe-to-video"): the model sees them
noise-free, and they come out exactly as given.

Folder of a video decoder (`save_video_decoder` / `load_video_decoder`):
    config.json + diffusion_pytorch_model.safetensors   the VideoDecoder (diffusers save_pretrained)
    scheduler_config.json                                the FlowMatchEulerDiscreteScheduler (its shift)
    vision_tokenizer/                                    the IBQ whose quantized embeddings condition it
    video_decoder.json                                   frame size, steps to sample with, text bytes, and
                                                         for a distilled student its teacher's steps

Shape letters as in model/video_decoder.py: B batch, C channels, F frames, H W frame size, S keyframes per
clip, D IBQ embedding size, h w IBQ grid, L text bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

DECODER_FILE = "video_decoder.json"
MODEL_TYPE = "worldsim-video-decoder"


# ---------------------------------------------------------------------------------------- schedule

def make_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ValueError(f"shift: must be a positive number, got {shift!r}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))


def base_sigmas(num_steps: int) -> list[float]:
    """The unshifted grid 1, (n-1)/n, ..., 1/n handed to the scheduler."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    return [1.0 - i / num_steps for i in range(num_steps)]


def set_schedule(scheduler, num_steps: int, device=None):
    """Sets the scheduler's n-step schedule; returns its sigmas (n + 1,), shifted, ending at 0."""
    scheduler.set_timesteps(sigmas=base_sigmas(num_steps), device=device)
    return scheduler.sigmas


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's static shift applied to base sigmas (the same formula; used for training noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


# ---------------------------------------------------------------------------------------- conditions

def pad_frames(num_frames: int) -> int:
    """Frames the model runs on: num_frames rounded up to a multiple of 4 (the extra ones are dropped)."""
    from model.video_decoder import FRAMES_PER_TOKEN  # here: importing diffusers takes seconds

    return -(-num_frames // FRAMES_PER_TOKEN) * FRAMES_PER_TOKEN


def text_to_bytes(texts: list[str | None], max_bytes: int) -> torch.Tensor:
    """Per-frame texts -> (len, max_bytes) long: UTF-8 bytes + 1, cut at max_bytes, 0 = padding/no text."""
    out = torch.zeros(len(texts), max_bytes, dtype=torch.long)
    for i, t in enumerate(texts):
        if t:
            raw = list(t.encode("utf-8")[:max_bytes])
            out[i, :len(raw)] = torch.tensor(raw, dtype=torch.long) + 1
    return out


@torch.no_grad()
def quantized_embeddings(ibq, images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] -> (n, D, H/f, W/f): the IBQ codes' embeddings, `quantize.lookup(encode(x))`."""
    return ibq.quantize.lookup(ibq.encode(images))


@dataclass
class Conditions:
    """The model inputs besides the noisy video, for a batch of clips of `num_frames` frames (padded)."""

    given: torch.Tensor  # (B, C, F, H, W): clean pixels of the clean frames, 0 elsewhere
    clean: torch.Tensor  # (B, F) float 0/1
    mask: torch.Tensor  # (B, F) float 0/1: frames whose tokens are given
    keyframe_embeds: torch.Tensor  # (B, D, F, h, w)
    text_bytes: torch.Tensor | None  # (B, F, L) long
    num_frames: int  # frames asked for (F may be larger: padding)
    motion: torch.Tensor | None = None  # motion_blend(given, clean), computed once for a motion_prior model

    def model_kwargs(self, model=None) -> dict:
        """The keyword arguments of `model`'s forward besides the noisy video and the timestep."""
        kw = dict(clean=self.clean, mask=self.mask, keyframe_embeds=self.keyframe_embeds, text_bytes=self.text_bytes)
        if getattr(getattr(model, "config", None), "motion_prior", False):
            if self.motion is None:
                from model.video_decoder import motion_blend

                self.motion = motion_blend(self.given, self.clean)
            kw["motion"] = self.motion
        return kw


def build_conditions(keyframes, indices: list[list[int]], num_frames: int, ibq,
                     texts: list[list[str | None]] | None = None, text_bytes: int = 64,
                     clean: list[list[bool]] | None = None) -> Conditions:
    """Conditions for B clips; clip b has S_b >= 2 keyframes.

    keyframes  (B, S, 3, H, W) float in [-1, 1], or a list of B tensors (S_b, 3, H, W), already at the
               decoder's frame size; all are encoded by the IBQ in one batch
    indices    B lists of S_b strictly increasing frame indices in [0, num_frames)
    texts      None, or B lists of S_b - 1 texts: text s describes the frames strictly between keyframes s, s+1
    clean      None (every keyframe clean) or B lists of S_b flags: which keyframes are written in
               noise-free; every keyframe's tokens are given either way (mask)
    """
    per_clip = list(keyframes)
    B = len(per_clip)
    if any(k.dim() != 4 or k.shape[0] < 2 for k in per_clip):
        raise ValueError(f"keyframes: need at least 2 per clip, got {[tuple(k.shape) for k in per_clip]}")
    if len(indices) != B or any(len(ix) != len(k) for ix, k in zip(indices, per_clip)):
        raise ValueError(f"indices: need one frame index per keyframe for each of the {B} clips, got {indices!r}")
    for ix in indices:
        if any(b <= a for a, b in zip(ix, ix[1:])) or ix[0] < 0 or ix[-1] >= num_frames:
            raise ValueError(f"indices: must increase strictly within [0, {num_frames}), got {ix}")
    if texts is not None and (len(texts) != B or any(len(t) != len(ix) - 1 for t, ix in zip(texts, indices))):
        raise ValueError("texts: need one list per clip, one text per gap between its keyframes")
    Fp = pad_frames(num_frames)
    C, H, W = per_clip[0].shape[1:]
    device = per_clip[0].device
    flat = torch.cat(per_clip)  # (sum S_b, 3, H, W)
    emb = quantized_embeddings(ibq, flat.to(next(ibq.parameters()).device)).to(device)  # (sum S_b, D, h, w)
    given = torch.zeros(B, C, Fp, H, W, device=device)
    cond = torch.zeros(B, emb.shape[1], Fp, *emb.shape[2:], device=device)
    clean_t = torch.zeros(B, Fp, device=device)
    mask = torch.zeros(B, Fp, device=device)
    frame_texts: list[list[str | None]] = [[None] * Fp for _ in range(B)]
    row = 0
    for b, ix in enumerate(indices):
        for s, f in enumerate(ix):
            mask[b, f] = 1.0
            cond[b, :, f] = emb[row + s]
            if clean is None or clean[b][s]:
                clean_t[b, f] = 1.0
                given[b, :, f] = flat[row + s]
            if texts is not None and s + 1 < len(ix):
                for g in range(f + 1, ix[s + 1]):
                    frame_texts[b][g] = texts[b][s]
        row += len(ix)
    tb = None
    if texts is not None:
        tb = text_to_bytes([t for row in frame_texts for t in row], text_bytes).reshape(B, Fp, text_bytes).to(device)
    return Conditions(given, clean_t, mask, cond, tb, num_frames)


# ---------------------------------------------------------------------------------------- sampling

def write_back(x: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """Clean frames take their given pixels exactly."""
    keep = cond.clean[:, None, :, None, None] > 0  # (B, 1, F, 1, 1)
    return torch.where(keep, cond.given.to(x.dtype), x)


@torch.no_grad()
def sample_video(model, cond: Conditions, *, num_steps: int, shift: float, generator: torch.Generator,
                 callback=None) -> torch.Tensor:
    """Euler flow-matching sampling with FlowMatchEulerDiscreteScheduler; returns (B, C, num_frames, H, W)
    in [-1, 1]. Clean frames are written back after every step, so they are reproduced exactly.
    callback(step, num_steps) after each step. Noise is drawn on the CPU from `generator`, so a seed gives
    the same video on any device."""
    scheduler = make_scheduler(shift)
    device = cond.given.device
    set_schedule(scheduler, num_steps, device=device)
    x = torch.randn(cond.given.shape, generator=generator).to(device)
    x = write_back(x, cond)
    B = x.shape[0]
    kwargs = cond.model_kwargs(model)
    for i, t in enumerate(scheduler.timesteps):
        v = model(x, t.expand(B), **kwargs).float()
        x = scheduler.step(v, t, x, return_dict=False)[0]
        x = write_back(x, cond)
        if callback:
            callback(i + 1, num_steps)
    return x[:, :, :cond.num_frames].clamp(-1.0, 1.0)


def euler_segment(model, x: torch.Tensor, sigmas: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """Plain Euler steps along per-clip sigma paths: sigmas (B, m + 1), from sigmas[:, 0] to sigmas[:, -1].
    The same update as the scheduler's `step`, for paths that differ per clip (distillation targets);
    writes back clean frames after each step. Grad follows torch's mode."""
    kwargs = cond.model_kwargs(model)
    for j in range(sigmas.shape[1] - 1):
        s, s_next = sigmas[:, j], sigmas[:, j + 1]
        v = model(x, s * 1000.0, **kwargs).float()
        x = write_back(x + (s_next - s)[:, None, None, None, None] * v, cond)
    return x


# ---------------------------------------------------------------------------------------- folder I/O

@dataclass
class DecoderSettings:
    """video_decoder.json: how to feed and sample the decoder in a folder."""

    frame_size: tuple[int, int] = (64, 64)  # (H, W) of the latent frames
    num_steps: int = 32  # steps to sample with
    shift: float = 3.0
    text_bytes: int = 64
    teacher_steps: int | None = None  # a step-distilled student: the steps of its teacher
    teacher: str | None = None  # the teacher's folder, when known (for evaluation)
    extra: dict = field(default_factory=dict)  # provenance: training data, steps, ...


def save_video_decoder(path: str, model, ibq, settings: DecoderSettings) -> None:
    from model.vision_tokenizer import save_ibq

    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_scheduler(settings.shift).save_pretrained(path)
    save_ibq(ibq, os.path.join(path, "vision_tokenizer"))
    raw = {"model_type": MODEL_TYPE, **asdict(settings)}
    raw["frame_size"] = list(settings.frame_size)
    with open(os.path.join(path, DECODER_FILE), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)


def is_video_decoder(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, DECODER_FILE))


def load_settings(path: str) -> DecoderSettings:
    file = os.path.join(path, DECODER_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"video_decoder: {path!r} has no {DECODER_FILE}; not a video decoder folder")
    with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.pop("model_type", None) != MODEL_TYPE:
        raise ValueError(f"video_decoder: {file} model_type must be {MODEL_TYPE!r}")
    raw["frame_size"] = tuple(raw["frame_size"])
    return DecoderSettings(**raw)


def load_video_decoder(path: str, device: str | torch.device = "cpu"):
    """-> (VideoDecoder in eval mode, IBQ in eval mode, DecoderSettings)."""
    from model.video_decoder import VideoDecoder
    from model.vision_tokenizer import load_ibq

    settings = load_settings(path)
    model = VideoDecoder.from_pretrained(path, low_cpu_mem_usage=False).to(device).eval()
    ibq = load_ibq(os.path.join(path, "vision_tokenizer"), device=device)
    if ibq.config.embed_dim != model.config.embed_channels:
        raise ValueError(f"video_decoder: IBQ embed_dim {ibq.config.embed_dim} != the decoder's "
                         f"embed_channels {model.config.embed_channels}")
    return model, ibq, settings


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 3, *size), antialiased bilinear (area-like when shrinking)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
