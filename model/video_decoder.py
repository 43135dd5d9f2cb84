"""Video decoder: a DiT denoiser that turns keyframes into the frames between them (SPEC §6, paper §2.4
"Video decoder"). Architecture only; the flow-matching sampler is model/video_sampling.py, training is
train/video_decoder.py, rendering a session is worldsim/video.py.

What the network sees (paper: "quantized embeddings from the VQ quantizer ... optional inter-frame textual
information ... an additional 4-channel mask to indicate which frames' tokens are provided"):
- the latent video being denoised. Our latent space is LOW-RESOLUTION PIXELS (e.g. 64 x 64, in [-1, 1]),
  not a learned video VAE and not the IBQ grid. Why: the paper starts from Wan2.2's video VAE, which we do
  not have; a pixel latent costs nothing to encode or decode on a CPU, needs no second trained network,
  and PSNR against the simulator's real frames is measured in the very space the model predicts. The
  IBQ grid (D x h x w) was the other candidate: its decoder only ever saw codebook vectors, so the
  continuous in-between latents a DiT predicts fall off its training manifold, and the quality of every
  frame would be capped by a small tokenizer's reconstruction.
- the keyframes' IBQ quantized embeddings (`IBQ.quantize.lookup(codes)`, D x h x w per frame), resampled
  to the DiT's token grid and given at the frames they belong to;
- the 4-channel mask. Frames are grouped 4 to a token in time (a "tubelet", like Wan's 4x temporal
  compression that the paper's 4 mask channels come from): mask channel k of latent step t says whether
  frame 4t + k has its tokens given. Any number of frames works: the sampler pads to a multiple of 4;
- which frames are CLEAN: a frame whose pixels are known is written into the latent video noise-free
  (Wan2.2 TI2V's way of giving a first frame). One token spans 4 frames that may differ in noise level,
  so the clean flags are input channels beside each frame's pixels rather than a per-token timestep;
  the AdaLN timestep is the noise level of the frames that are not clean;
- optional text between frames: the mean of a learned byte embedding table over the text's UTF-8 bytes
  (no tokenizer to ship, and any language works; enough for short instructions such as "turn left"),
  averaged over the frames of a tubelet that have text, projected and added to that tubelet's tokens.

Output: the flow-matching velocity (noise - data) for every frame (B, C, F, H, W); the sampler keeps
the clean frames as given. With `prediction_type="sample"` (the default) the network's last layer
predicts the clean frames x0 and the velocity is derived as (x_t - x0) / sigma, sigma floored at 0.05
(JiT, "Back to Basics: Let Generative Models Denoise", 2025): a patch of 4 x 8 x 8 x 3 = 768 values
predicted from a few hundred hidden channels cannot hold per-pixel noise, so a pixel-space DiT that
predicts velocity (or noise) directly stalls - our first run did, its loss flat at ~0.8 - while clean
frames are smooth enough to fit. "velocity" keeps the plain parameterisation.

With `blend_prior=True` (default; "sample" prediction only) the predicted clean frames are a RESIDUAL
over the linear blend of the nearest clean frames before and after each frame (`clean_blend`; a frame
with a clean frame on one side only copies it). The network starts out as the cross-fade baseline and
spends its capacity on what a cross-fade gets wrong - motion - instead of re-drawing static backgrounds
that the keyframes already give pixel for pixel (without it, the first CPU run's frames at step 600 were
blocky copies of the keyframes, 3-5 dB under the cross-fade). It is computed from the inputs in
`forward` with tensor ops only.

With `sigma_data > 0` (on top of the blend prior) the prediction is preconditioned as in EDM (Karras et
al. 2022), written for the flow x_t = (1 - sigma) x0 + sigma noise: with u = x_t - (1 - sigma) blend,
    x0 = blend + c_skip u + c_out net,   c_skip = (1-sigma) s^2 / d^2,   c_out = s sigma / d,
    d^2 = (1-sigma)^2 s^2 + sigma^2,     s = sigma_data (the spread of x0 - blend).
c_skip u is the best linear guess of x0 - blend from the noisy frames, so at low noise the frames pass
through without the network (a run without it, at step 1,250, denoised sigma = 0.1 barely better than the
blend: its 768-value patches cannot carry pixels through a few hundred channels) and the network's
output, scaled by c_out, only has to supply what the noisy frames do not show; at sigma = 1 the
prediction is blend + s * net. sigma_data = 0 keeps the plain residual.

With `motion_prior=True` (on top of the blend prior) the prior is a per-pixel mix of the linear blend
and a MOTION-COMPENSATED blend (`motion_blend`): for the frames between two clean frames, the motion
through each pixel is found by bilateral block matching (`bilateral_flow`: the displacement d for which
first(x - d/2) matches last(x + d/2) over a small window, searched exhaustively at half resolution) and
both clean frames are warped along it to the frame's time before blending. The network sees both blends
as extra input pixels and predicts, beside its residual, a per-pixel gate g = sigmoid(8 out) (0.5
untrained): prior = blend + g (motion - blend). The factor 8 lets Adam's bounded steps move the gate as
fast as the residual: without it, after 1,250 steps the mean gate was still 0.59 / 0.39 / 0.68 on
ViZDoom / Crafter / PyBullet and the decoder had not got past the even mix. Why a prior at all: the
small DiT did not learn to move content between keyframes on a CPU budget (at sigma 1 it stayed at the
cross-fade), while warping is what frame interpolation needs first. On 12 held-out simulator gaps of 4
frames each at 64 x 64 (cross-fade -> motion blend alone): ViZDoom turning and walking 27.6 -> 28.8 dB,
the Panda arm 23.7 -> 28.9 dB, but Crafter 25.8 -> 24.5 dB (its view jumps a whole tile a move, so a
smooth warp of the net displacement is wrong where the path turns): hence a learned gate rather than a
fixed choice. The search costs ~0.03 s a gap on one CPU thread and is done once per sampling
(`Conditions.model_kwargs`). The shipped decoder's figures are in assets/README.md.

The body is a plain DiT: patch embedding, fixed 3-D sine-cosine positions (so any frame count and any
grid of patches works), AdaLN-Zero blocks of full bidirectional self-attention (with QK RMSNorm) and a
GELU MLP, and a zero-initialised AdaLN output layer (the first prediction is x0 = 0). It is a diffusers
`ModelMixin` + `ConfigMixin`:
`save_pretrained` / `from_pretrained` write and read config.json + diffusion_pytorch_model.safetensors.

Shape letters:
  B batch, C latent channels (3, RGB), F frames (a multiple of K inside the model), K frames per token (4),
  T = F/K latent time steps, H W latent frame size in px, p patch side, gh gw = H/p, W/p token grid,
  N = T*gh*gw tokens, E hidden size, A heads, Dh head size, D IBQ embedding size, h w the IBQ grid,
  L text bytes, Q text embedding size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

FRAMES_PER_TOKEN = 4  # the 4 mask channels of the paper: one per frame of a tubelet
TEXT_VOCAB = 257  # UTF-8 byte + 1; 0 is padding
PRESETS = ("debug", "small", "demo")
PREDICTION_TYPES = ("sample", "velocity")
MIN_SIGMA = 0.05  # floor of sigma when a predicted sample is turned into a velocity


def video_decoder_preset(name: str, embed_channels: int) -> dict:
    """Keyword arguments of `VideoDecoder` for a named size; `embed_channels` is the IBQ's embed_dim.
    `debug`: a forward pass in milliseconds (tests); `small`: the first CPU training run; `demo`: the
    size meant for the shipped decoder."""
    sizes = {"debug": dict(hidden_size=64, depth=2, num_heads=2, text_dim=16),
             "small": dict(hidden_size=192, depth=4, num_heads=3, text_dim=32),
             "demo": dict(hidden_size=384, depth=10, num_heads=6, text_dim=64)}
    if name not in sizes:
        raise ValueError(f"preset: must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(embed_channels=embed_channels, patch_size=8, **sizes[name])


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(n,) float positions -> (n, dim) [sin | cos] with geometric frequencies 1 .. 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]  # (n, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def positions_3d(T: int, gh: int, gw: int, dim: int, device) -> torch.Tensor:
    """Fixed (N, E) position table: a quarter of the channels for time, the rest split between y and x."""
    d_t = 2 * (dim // 8)
    d_y = 2 * ((dim - d_t) // 4)
    d_x = dim - d_t - d_y
    t = _sincos(torch.arange(T, device=device), d_t)[:, None, None].expand(T, gh, gw, d_t)
    y = _sincos(torch.arange(gh, device=device), d_y)[None, :, None].expand(T, gh, gw, d_y)
    x = _sincos(torch.arange(gw, device=device), d_x)[None, None, :].expand(T, gh, gw, d_x)
    return torch.cat([t, y, x], dim=-1).reshape(T * gh * gw, dim)  # (T, gh, gw, E) -> (N, E)


GATE_SCALE = 8.0  # motion_prior: the gate is sigmoid(GATE_SCALE * output) (see VideoDecoder.forward)


def _neighbours(clean: torch.Tensor, dtype):
    """(B, F) 0/1 -> prev, nxt (B, F) long: the nearest clean frame at or before / at or after each frame
    (-1 / F when none), and a (B, F): the weight of `nxt` in the linear blend (by frame distance; one side
    only: 0 or 1 for the side there is; none: 0)."""
    B, Fn = clean.shape
    idx = torch.arange(Fn, device=clean.device).expand(B, Fn)
    is_clean = clean > 0.5
    prev = torch.where(is_clean, idx, -1).cummax(dim=1).values
    nxt = torch.where(is_clean, idx, Fn).flip(1).cummin(dim=1).values.flip(1)
    has_prev, has_next = prev >= 0, nxt < Fn
    span = (nxt - prev).clamp(min=1).to(dtype)
    a = torch.where(has_prev & has_next, (idx - prev).to(dtype) / span,
                    torch.where(has_next, 1.0, 0.0).to(dtype))
    return prev, nxt, a


def clean_blend(latents: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W), (B, F) 0/1 -> (B, C, F, H, W): each frame as the linear blend (by frame distance) of
    the nearest clean frames before and after it; one side only: a copy of it; none: zeros. Clean frames
    map to themselves."""
    B, C, Fn = latents.shape[:3]
    prev, nxt, a = _neighbours(clean, latents.dtype)

    def frames_at(ix):  # (B, F) indices -> (B, C, F, H, W)
        ix = ix.clamp(0, Fn - 1)[:, None, :, None, None].expand(B, C, Fn, *latents.shape[3:])
        return latents.gather(2, ix)

    any_side = ((prev >= 0) | (nxt < Fn)).to(latents.dtype)[:, None, :, None, None]
    w = a[:, None, :, None, None]
    return ((1 - w) * frames_at(prev) + w * frames_at(nxt)) * any_side


def _sample_at(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """img (N, C, H, W), flow (N, 2, H, W) in pixels (dx, dy) -> (N, C, H, W): img(x + flow(x)), bilinear,
    borders repeated."""
    N, _, H, W = img.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=img.device, dtype=img.dtype),
                            torch.arange(W, device=img.device, dtype=img.dtype), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0] + 0.5) * (2 / W) - 1, (ys + flow[:, 1] + 0.5) * (2 / H) - 1], dim=-1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def bilateral_flow(first: torch.Tensor, last: torch.Tensor, window: int = 7, penalty: float = 1.2e-4) -> torch.Tensor:
    """Motion through each pixel of the frame midway between `first` and `last` (N, C, H, W): the
    displacement d (N, 2, H, W), in pixels, for which first(x - d/2) matches last(x + d/2) best over a
    `window` box at half resolution (mean over it of the squared differences summed over channels, plus
    `penalty` |d|^2, so flat regions keep small motion). Searched exhaustively at half resolution over
    |dx| <= W/4, |dy| <= H/8 (steps of 2 px). Bilateral (symmetric) matching gives every pixel of the
    in-between frame one motion, so warping leaves no holes."""
    N, C, H, W = first.shape
    a, b = F.avg_pool2d(first, 2), F.avg_pool2d(last, 2)
    h, w = a.shape[2:]
    rx, ry = max(1, W // 8), max(1, H // 16)  # half-resolution pixels
    dy, dx = torch.meshgrid(torch.arange(-ry, ry + 1.0, device=first.device),
                            torch.arange(-rx, rx + 1.0, device=first.device), indexing="ij")
    cand = torch.stack([dx.flatten(), dy.flatten()], dim=1).to(first.dtype)  # (M, 2) half-res pixels
    M = len(cand)
    flow = cand[None, :, :, None, None].expand(N, M, 2, h, w).reshape(N * M, 2, h, w) / 2
    fa = _sample_at(a.repeat_interleave(M, 0), -flow)
    fb = _sample_at(b.repeat_interleave(M, 0), flow)
    err = ((fa - fb) ** 2).sum(1, keepdim=True)
    err = F.avg_pool2d(err, window, 1, window // 2, count_include_pad=False).reshape(N, M, h, w)
    err = err + penalty * 4 * (cand ** 2).sum(1)[None, :, None, None]
    best = cand[err.argmin(1)]  # (N, h, w, 2)
    return F.interpolate(best.permute(0, 3, 1, 2) * 2, size=(H, W), mode="nearest")


def motion_blend(latents: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Like clean_blend, but a frame between two clean frames is their MOTION-COMPENSATED blend: both are
    warped along the bilateral_flow between them to the frame's time a, then blended (1 - a, a). Frames
    with a clean frame on one side only, or none, are as in clean_blend."""
    B, C, Fn, H, W = latents.shape
    out = clean_blend(latents, clean)
    prev, nxt, a = _neighbours(clean, latents.dtype)
    inside = (prev >= 0) & (nxt < Fn) & (nxt - prev > 1) & (prev != torch.arange(Fn, device=clean.device))
    if not inside.any():
        return out
    gaps = sorted({(b, int(prev[b, f]), int(nxt[b, f])) for b, f in inside.nonzero().tolist()})
    firsts = torch.stack([latents[b, :, p] for b, p, _ in gaps])
    lasts = torch.stack([latents[b, :, q] for b, _, q in gaps])
    flows = bilateral_flow(firsts.float(), lasts.float()).to(latents.dtype)
    out = out.clone()
    for g, (b, p, q) in enumerate(gaps):
        for f in range(p + 1, q):
            t = float(a[b, f])
            wa = _sample_at(firsts[g:g + 1], -t * flows[g:g + 1])
            wb = _sample_at(lasts[g:g + 1], (1 - t) * flows[g:g + 1])
            out[b, :, f] = ((1 - t) * wa + t * wb)[0]
    return out


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # x (B, N, E); shift, scale (B, E)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E)
        B, N, E = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, A, N, Dh)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)  # (B, A, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, E))


class DiTBlock(nn.Module):
    """AdaLN-Zero: shift/scale/gate of both sub-layers from the timestep embedding; gates start at 0 so
    every block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (B, N, E), c (B, E)
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)  # each (B, E)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class VideoDecoder(ModelMixin, ConfigMixin):
    """Velocity predictor v(x_t, t | keyframes). See the module docstring for the inputs' meaning.

    forward(latents, timestep, clean, mask, keyframe_embeds, text_bytes=None):
      latents          (B, C, F, H, W) float: the video at noise level timestep/num_train_timesteps, clean
                       frames written in noise-free; F a multiple of 4, H and W multiples of patch_size
      timestep         (B,) float in [0, num_train_timesteps]: noise level of the frames that are not clean
      clean            (B, F) float 0/1: frames written in noise-free
      mask             (B, F) float 0/1: frames whose tokens are given (the 4-channel mask, grouped by 4)
      keyframe_embeds  (B, D, F, h, w) float: IBQ quantized embeddings of the given frames (any grid h x w;
                       resampled to gh x gw; multiplied by `mask`, so other frames' values are ignored)
      text_bytes       (B, F, L) long or None: UTF-8 bytes + 1 of each frame's text, 0 = padding
    returns            (B, C, F, H, W) float velocity (noise - data)
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, embed_channels: int = 32, patch_size: int = 8,
                 hidden_size: int = 256, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0,
                 text_dim: int = 64, num_train_timesteps: int = 1000, prediction_type: str = "sample",
                 blend_prior: bool = True, sigma_data: float = 0.0, motion_prior: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        if not sigma_data >= 0 or (sigma_data and not (blend_prior and prediction_type == "sample")):
            raise ValueError(f"sigma_data: must be >= 0, and > 0 only with blend_prior and prediction_type "
                             f"'sample', got {sigma_data!r}")
        if motion_prior and not (blend_prior and prediction_type == "sample"):
            raise ValueError("motion_prior: needs blend_prior and prediction_type 'sample'")
        for name, v in (("in_channels", in_channels), ("embed_channels", embed_channels),
                        ("patch_size", patch_size), ("hidden_size", hidden_size), ("depth", depth),
                        ("num_heads", num_heads), ("text_dim", text_dim),
                        ("num_train_timesteps", num_train_timesteps)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if hidden_size % num_heads or hidden_size % 16:
            raise ValueError(f"hidden_size: must be a multiple of 16 and of num_heads={num_heads}, got {hidden_size}")
        K, p, C, D, E = FRAMES_PER_TOKEN, patch_size, in_channels, embed_channels, hidden_size
        # per frame of a tubelet: its pixels (C p p), clean flag, mask flag, IBQ embedding (D); with
        # motion_prior also the linear and the motion-compensated blends' pixels (2 C p p)
        pixels = (3 if motion_prior else 1) * C * p * p
        self.patch_in = nn.Linear(K * (pixels + 2 + D), E)
        self.time_mlp = nn.Sequential(nn.Linear(256, E), nn.SiLU(), nn.Linear(E, E))
        self.text_table = nn.Embedding(TEXT_VOCAB, text_dim, padding_idx=0)
        self.text_proj = nn.Linear(text_dim, E)
        self.blocks = nn.ModuleList([DiTBlock(E, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(E, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(E, 2 * E)
        self.patch_out = nn.Linear(E, K * (C + int(motion_prior)) * p * p)  # + the gate with motion_prior
        for layer in (self.ada_out, self.patch_out):  # the model starts by predicting zero velocity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- pieces ------------------------------------------------------------------------------------
    def _tokens(self, latents, clean, mask, keyframe_embeds) -> torch.Tensor:
        """-> (B, N, K*(C' p p + 2 + D)) tubelet features, token order (t, y, x); latents (B, C', F, H, W)."""
        B, C, Fn, H, W = latents.shape
        K, p = FRAMES_PER_TOKEN, self.config.patch_size
        T, gh, gw = Fn // K, H // p, W // p
        px = latents.reshape(B, C, T, K, gh, p, gw, p)
        px = px.permute(0, 2, 4, 6, 3, 1, 5, 7).reshape(B, T, gh, gw, K, C * p * p)  # (B, T, gh, gw, K, C' p p)
        D, h, w = keyframe_embeds.shape[1], keyframe_embeds.shape[3], keyframe_embeds.shape[4]
        emb = keyframe_embeds.to(latents.dtype).permute(0, 2, 1, 3, 4).reshape(B * Fn, D, h, w)  # (B F, D, h, w)
        if (h, w) != (gh, gw):
            emb = F.interpolate(emb, size=(gh, gw), mode="bilinear", align_corners=False, antialias=gh < h or gw < w)
        emb = emb.reshape(B, T, K, D, gh, gw).permute(0, 1, 4, 5, 2, 3)  # (B, T, gh, gw, K, D)
        m = mask.to(latents.dtype).reshape(B, T, 1, 1, K, 1).expand(B, T, gh, gw, K, 1)
        c = clean.to(latents.dtype).reshape(B, T, 1, 1, K, 1).expand(B, T, gh, gw, K, 1)
        feats = torch.cat([px, c, m, emb * m], dim=-1)  # (B, T, gh, gw, K, C p p + 2 + D)
        return feats.reshape(B, T * gh * gw, -1)

    def _text(self, text_bytes: torch.Tensor, B: int, T: int, dtype) -> torch.Tensor:
        """(B, F, L) -> (B, T, E): mean byte embedding per frame, mean over the tubelet's frames with text."""
        K = FRAMES_PER_TOKEN
        valid = (text_bytes > 0).to(dtype)  # (B, F, L)
        per_frame = (self.text_table(text_bytes).to(dtype) * valid[..., None]).sum(2)  # (B, F, Q)
        per_frame = per_frame / valid.sum(2, keepdim=True).clamp(min=1)
        has = (valid.sum(2) > 0).to(dtype).reshape(B, T, K, 1)  # frames with text
        per_step = (per_frame.reshape(B, T, K, -1) * has).sum(2) / has.sum(2).clamp(min=1)  # (B, T, Q)
        return self.text_proj(per_step) * (has.sum(2) > 0).to(dtype)  # no text -> exactly zero

    def _timestep(self, timestep: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, E)
        return self.time_mlp(_sincos(timestep, 256))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                keyframe_embeds: torch.Tensor, text_bytes: torch.Tensor | None = None,
                motion: torch.Tensor | None = None) -> torch.Tensor:
        B, C, Fn, H, W = latents.shape
        K, p = FRAMES_PER_TOKEN, self.config.patch_size
        assert Fn % K == 0 and H % p == 0 and W % p == 0, (Fn, H, W)
        assert clean.shape == mask.shape == (B, Fn) and keyframe_embeds.shape[:3] == (B, self.config.embed_channels, Fn)
        T, gh, gw = Fn // K, H // p, W // p
        pixels = latents
        if self.config.motion_prior:  # `motion`: motion_blend of the clean frames, when the caller has it
            blend = clean_blend(latents, clean)
            motion = (motion_blend(latents, clean) if motion is None else motion).to(latents.dtype)
            pixels = torch.cat([latents, blend, motion], dim=1)
        x = self.patch_in(self._tokens(pixels, clean, mask, keyframe_embeds))  # (B, N, E)
        x = x + positions_3d(T, gh, gw, x.shape[-1], x.device).to(x.dtype)[None]
        if text_bytes is not None:
            assert text_bytes.shape[:2] == (B, Fn)
            x = (x.reshape(B, T, gh * gw, -1) + self._text(text_bytes, B, T, x.dtype)[:, :, None]).reshape(x.shape)
        c = self._timestep(timestep.reshape(B).to(latents.device))  # (B, E)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        out = self.patch_out(_modulate(self.norm_out(x), shift, scale))  # (B, N, K C' p p)
        Co = out.shape[-1] // (K * p * p)
        out = out.reshape(B, T, gh, gw, K, Co, p, p).permute(0, 5, 1, 4, 2, 6, 3, 7)  # (B, C', T, K, gh, p, gw, p)
        out = out.reshape(B, Co, Fn, H, W)
        if self.config.prediction_type == "velocity":
            return out
        t = (timestep.reshape(B).to(out.dtype) / self.config.num_train_timesteps)[:, None, None, None, None]
        if self.config.blend_prior:
            if self.config.motion_prior:  # the prior: the blends mixed by the predicted per-pixel gate
                gate = torch.sigmoid(GATE_SCALE * out[:, C:])
                out, blend = out[:, :C], blend + gate * (motion - blend)
            else:
                blend = clean_blend(latents, clean)
            s = self.config.sigma_data
            if s:  # EDM preconditioning around the blend (module docstring)
                d2 = (1 - t) ** 2 * s * s + t * t
                out = blend + (1 - t) * s * s / d2 * (latents - (1 - t) * blend) + s * t / d2.sqrt() * out
            else:
                out = out + blend
        return (latents - out) / t.clamp(min=MIN_SIGMA)  # v = (x_t - x0) / sigma
