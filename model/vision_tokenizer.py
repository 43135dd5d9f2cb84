"""IBQ image tokenizer: a VQGAN-style conv encoder/decoder with an index-propagation quantizer.

SPEC §4; paper §2.3 (IBQ, downsampling 16, codebook 131,072 x 256, ~455M params) and §5.2 (training
losses). The module tree and parameter names follow the taming-transformers / SEED-Voken IBQ layout
so the official `config.yaml` + `model.ckpt` load unchanged. The official loader builds `IBQ(**config)`
and loads `model.ckpt` strictly, so its config holds `embed_dim`, `n_embed` and `ddconfig` at the top
level; the taming training form (`model: {target, params: {...}}`) is accepted too.

Choices where SPEC is silent, written down here:
- the codebook is drawn N(0, 1/D): rows have norm ~1 so the first `z_q` has the scale of `z`
  (taming's U(-1/N, 1/N) makes z_q ~1e-5 at N = 131,072);
- the `emu3.5` preset's width (base 256, 4 blocks per level, attention at 16 px features) is what
  gives the paper's 455M params; `load_ibq` still reads every size from the checkpoint's config;
- attention uses `scaled_dot_product_attention` (same math as q·k^T/sqrt(C), softmax, ·v) so a
  1024 px image (4,096 positions) does not materialise its L x L matrix on GPU.

Shape letters:
  B batch, C channels, H W image height/width in px, f downsample factor (2**(levels-1)),
  h w token grid (H/f, W/f), L = h*w (positions in a feature map), D embed_dim (code vector size),
  Z z_channels (encoder output), N codebook_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "worldsim-ibq"
PRESETS = ("debug", "demo", "emu3.5")
# Top-level modules of an IBQ state dict; anything else in a checkpoint (e.g. `loss.` discriminator
# and LPIPS weights of a training run) is not part of the tokenizer and is skipped on load.
_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.", "patch_in.", "patch_out.")


@dataclass(frozen=True)
class IBQConfig:
    """Sizes of the tokenizer. `attn_resolutions` are feature-map sides, counted for a
    `resolution` x `resolution` input, at which down/up levels add attention (taming convention);
    `resolution` only places attention, it does not restrict the input size."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 131072
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups on every width; the official checkpoints use 32
    patch_shortcut: bool = False  # a linear f x f patch path beside encoder and decoder (see IBQ); not official

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "resolution",
                     "z_channels", "embed_dim", "codebook_size"):
            _check_positive_int(name, getattr(self, name))
        # GroupNorm runs with norm_groups groups on every level width (base_channels * mult).
        _check_positive_int("norm_groups", self.norm_groups)
        if self.base_channels % self.norm_groups:
            raise ValueError(f"base_channels: must be a multiple of norm_groups={self.norm_groups} "
                             f"(GroupNorm's groups), got {self.base_channels}")
        for name in ("channel_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{name}: must be a tuple of positive integers, got {value!r}")
            for item in value:
                _check_positive_int(name, item)
            object.__setattr__(self, name, tuple(value))  # YAML/JSON give lists; same values
        if not self.channel_mult:
            raise ValueError("channel_mult: must hold at least one level, got ()")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution: must be a multiple of downsample_factor={self.downsample_factor}, "
                             f"got {self.resolution}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def ibq_preset(name: str) -> IBQConfig:
    """`debug`: factor 16, forward on 64 px in milliseconds; `demo`: the shipped small model, factor 8;
    `emu3.5`: the official sizes (455M params, codebook 131,072 x 256, factor 16)."""
    if name == "debug":
        return IBQConfig(base_channels=32, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=1,
                         attn_resolutions=(4,), resolution=64, z_channels=32, embed_dim=32,
                         codebook_size=256)
    if name == "demo":
        return IBQConfig(base_channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                         attn_resolutions=(), resolution=256, z_channels=64, embed_dim=64,
                         codebook_size=2048)
    if name == "emu3.5":
        return IBQConfig(base_channels=256, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=4,
                         attn_resolutions=(16,), resolution=256, z_channels=256, embed_dim=256,
                         codebook_size=131072)
    raise ValueError(f"preset: must be one of {', '.join(PRESETS)}, got {name!r}")


# ----------------------------------------------------------------------------------------- layers

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 `nin_shortcut` only where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, 1x1 conv projections, residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # one head: (B, C, H, W) -> (B, 1, L, C)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)  # (B, 1, L, C)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        # Pad right/bottom only (taming): with stride 2 and no padding a symmetric pad would shift
        # the sampling grid by half a pixel relative to the checkpoints' training.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResBlock(channels, channels, dropout, groups)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Blocks of one down/up level, each followed by its attention block when the level has them."""
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, Z, h, w)."""

    def __init__(self, cfg: IBQConfig):
        super().__init__()
        ch, num_levels = cfg.base_channels, len(cfg.channel_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, ch
        for i, mult in enumerate(cfg.channel_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResBlock(c_in, ch * mult, cfg.dropout, cfg.norm_groups))
                c_in = ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg.norm_groups))
            if i != num_levels - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c_in, cfg.dropout, cfg.norm_groups)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Z, h, w) -> (B, 3, H, W), unbounded (IBQ.decode clamps)."""

    def __init__(self, cfg: IBQConfig):
        super().__init__()
        ch, num_levels = cfg.base_channels, len(cfg.channel_mult)
        c_in = ch * cfg.channel_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, cfg.dropout, cfg.norm_groups)
        # Built coarsest first but stored so that up[i] mirrors down[i] (the checkpoints' numbering).
        levels: list[nn.Module] = [nn.Module() for _ in range(num_levels)]
        for i in reversed(range(num_levels)):
            level = levels[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResBlock(c_in, ch * cfg.channel_mult[i], cfg.dropout, cfg.norm_groups))
                c_in = ch * cfg.channel_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg.norm_groups))
            if i != 0:
                level.upsample = Upsample(c_in)
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class IndexPropagationQuantizer(nn.Module):
    """Code = argmax of the dot product z·e (not the nearest e in L2: a long code vector wins).

    In training the one-hot of the argmax is made differentiable through the softmax of the same
    logits (straight-through), so every codebook row gets a gradient and none is left dead.
    """

    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.normal_(self.embedding.weight, std=embed_dim ** -0.5)

    def logits(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, h, w, N)
        return torch.einsum("bdhw,nd->bhwn", z, self.embedding.weight)

    def codes(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, h, w) long
        return self.logits(z).argmax(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, D, h, w)
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> z_q (B, D, h, w), codes (B, h, w) long, scalar quantization loss."""
        logits = self.logits(z)  # (B, h, w, N)
        soft = logits.softmax(dim=-1)
        codes = logits.argmax(dim=-1)  # (B, h, w)
        hard = F.one_hot(codes, soft.shape[-1]).to(soft.dtype)  # (B, h, w, N)
        one_hot = hard - soft.detach() + soft  # value of `hard`, gradient of `soft`
        z_q = (one_hot @ self.embedding.weight).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        loss = self.beta * F.mse_loss(z_q.detach(), z) + F.mse_loss(z_q, z.detach())
        return z_q, codes, loss


class IBQ(nn.Module):
    """Images (B, 3, H, W) float in [-1, 1], H and W multiples of f  <->  codes (B, h, w) long in [0, N).

    `patch_shortcut` (ours, for small CPU-trained tokenizers; the official model has none) adds a linear
    path beside the conv nets: an f x f stride-f conv from pixels into the pre-quantization latents and an
    f x f transposed conv from the quantized embeddings back to pixels, summed with the encoder's and the
    decoder's outputs. On ViZDoom/Crafter/PyBullet crops a continuous autoencoder of the 4.2M `demo`
    tokenizer reached L1 0.244 after 150 steps without it and 0.094 with it (a linear patch autoencoder
    alone: 0.089): the deep conv path learns slowly from scratch, the linear path carries the picture
    from the first steps and the conv path refines it."""

    def __init__(self, config: IBQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize = IndexPropagationQuantizer(config.codebook_size, config.embed_dim)
        if config.patch_shortcut:
            f = config.downsample_factor
            self.patch_in = nn.Conv2d(config.in_channels, config.embed_dim, f, stride=f)
            self.patch_out = nn.ConvTranspose2d(config.embed_dim, config.out_channels, f, stride=f)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images (B, 3, H, W) -> pre-quantization latents (B, D, h, w)."""
        z = self.quant_conv(self.encoder(images))
        return z + self.patch_in(images) if self.config.patch_shortcut else z

    def reconstruct(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized embeddings (B, D, h, w) -> unclamped images (B, 3, H, W)."""
        y = self.decoder(self.post_quant_conv(z_q))
        return y + self.patch_out(z_q) if self.config.patch_shortcut else y

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        f, c = self.config.downsample_factor, self.config.in_channels
        if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == c
                and images.is_floating_point()):
            found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: must be a float tensor (B, {c}, H, W), got {found}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images: H and W must be multiples of the downsample factor {f}, "
                             f"got {images.shape[2]}x{images.shape[3]} (resize_to_area rounds sides)")
        return images.to(self.quant_conv.weight.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long. No graph: argmax has no gradient."""
        images = self._check_images(images)
        return self.quantize.codes(self.latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) long in [0, N) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        n = self.config.codebook_size
        if not (isinstance(codes, torch.Tensor) and codes.dim() == 3 and not codes.is_floating_point()
                and not codes.is_complex() and codes.dtype != torch.bool):
            found = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes)
            raise ValueError(f"codes: must be an integer tensor (B, h, w), got {found}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"codes: must lie in [0, {n}), got min {int(codes.min())} max {int(codes.max())}")
        z_q = self.quantize.lookup(codes.long())  # (B, D, h, w)
        return self.reconstruct(z_q).clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (B, 3, H, W) unclamped so its loss keeps gradients,
        codes (B, h, w), quantization loss)."""
        z_q, codes, loss = self.quantize(self.latents(self._check_images(images)))
        return self.reconstruct(z_q), codes, loss


# ------------------------------------------------------------------------------------ pixel helpers

def to_tensor(image) -> torch.Tensor:
    """PIL image (any mode, converted to RGB) or uint8 array (H, W, 3) -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: must be a PIL image or a uint8 array (H, W, 3), "
                         f"got {array.dtype} {array.shape}")
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return pixels.float() / 127.5 - 1.0


def to_pil(tensor: torch.Tensor):
    """(3, H, W) float in [-1, 1] -> RGB PIL image; values outside the range saturate."""
    from PIL import Image

    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor: must have shape (3, H, W), got {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def area_grid(width: int, height: int, area: int, patch: int) -> tuple[int, int]:
    """(rows, cols) of patches for a width x height picture scaled to about `area` px with its aspect
    kept: each side the nearest whole number of patches, at least one."""
    scale = math.sqrt(area / (width * height))
    return max(1, round(height * scale / patch)), max(1, round(width * scale / patch))


def resize_to_area(image, area: int, patch: int):
    """Bicubic resize keeping the aspect ratio so that H*W ~= `area`, each side the nearest multiple
    of `patch` (at least one patch, area_grid). Rounding moves each side by at most patch/2."""
    from PIL import Image

    _check_positive_int("patch", patch)
    _check_positive_int("area", area)
    if area < patch * patch:
        raise ValueError(f"area: must be at least one patch ({patch}x{patch} = {patch * patch} px), got {area}")
    width, height = image.size
    if width < patch or height < patch:
        raise ValueError(f"image: {width}x{height} px is smaller than one patch of {patch} px; "
                         f"upscale it before tokenizing")
    rows, cols = area_grid(width, height, area, patch)
    return image.resize((cols * patch, rows * patch), Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------- checkpoint I/O

# IBQConfig field <- official ddconfig field (taming names).
_OFFICIAL_DD = {"in_channels": "in_channels", "out_channels": "out_ch", "base_channels": "ch",
                "channel_mult": "ch_mult", "num_res_blocks": "num_res_blocks",
                "attn_resolutions": "attn_resolutions", "resolution": "resolution",
                "z_channels": "z_channels"}


def _config_from_official(raw, source: str) -> IBQConfig:
    """Official config (top-level kwargs, or taming `model.params`, with a `ddconfig` block) -> IBQConfig."""
    params = raw.get("model", {}).get("params", raw) if isinstance(raw, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{source}: expected a mapping with `embed_dim`, `n_embed` and `ddconfig`")
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, dict):
        raise ValueError(f"{source}: missing field `ddconfig` (a mapping of encoder/decoder sizes)")
    for name in ("embed_dim", "n_embed"):
        if name not in params:
            raise ValueError(f"{source}: missing field `{name}`")
    missing = [src for src in _OFFICIAL_DD.values() if src not in ddconfig]
    if missing:
        raise ValueError(f"{source}: missing field `ddconfig.{missing[0]}`")
    if ddconfig.get("double_z", False):
        raise ValueError(f"{source}: ddconfig.double_z must be false for IBQ, got {ddconfig['double_z']!r}")
    return IBQConfig(embed_dim=params["embed_dim"], codebook_size=params["n_embed"],
                     dropout=ddconfig.get("dropout", 0.0),  # no parameters depend on it
                     **{ours: ddconfig[src] for ours, src in _OFFICIAL_DD.items()})


def _config_from_ours(raw, source: str) -> IBQConfig:
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{source}: model_type must be {MODEL_TYPE!r}, got {found!r}")
    fields = [f.name for f in dataclasses.fields(IBQConfig)]
    optional = {"norm_groups", "patch_shortcut"}  # added later; older folders have the defaults
    for name in fields:
        if name not in raw and name not in optional:
            raise ValueError(f"{source}: missing field `{name}`")
    unknown = sorted(set(raw) - set(fields) - {"model_type"})
    if unknown:
        raise ValueError(f"{source}: unknown field `{unknown[0]}`; allowed: {', '.join(fields)}")
    return IBQConfig(**{name: raw[name] for name in fields if name in raw})


def _load_state(model: IBQ, state: dict, source: str) -> None:
    """Strict load of the tokenizer's own tensors; each problem names the key and both shapes."""
    state = {k: v for k, v in state.items() if k.startswith(_PREFIXES)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{source}: missing tensor `{key}` (expected shape {shape} from the config)")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: tensor `{key}` has shape {tuple(state[key].shape)}, "
                             f"expected {shape} from the config")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor `{unexpected[0]}` ({len(unexpected)} in all); "
                         f"the config does not describe it")
    model.load_state_dict(state, strict=True, assign=True)


def load_ibq(path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> IBQ:
    """Load a tokenizer folder in eval mode: official (`config.yaml` + `model.ckpt`) or ours
    (`config.json` + `model.safetensors`). dtype None keeps float32: codes are an argmax and
    lower precision flips near-ties."""
    path = os.fspath(path)
    yaml_path, ckpt_path = os.path.join(path, "config.yaml"), os.path.join(path, "model.ckpt")
    json_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(yaml_path) and os.path.isfile(ckpt_path):
        import yaml

        with open(yaml_path) as f:
            config = _config_from_official(yaml.safe_load(f), yaml_path)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        source = ckpt_path
    elif os.path.isfile(json_path) and os.path.isfile(st_path):
        from safetensors.torch import load_file

        with open(json_path) as f:
            config = _config_from_ours(json.load(f), json_path)
        state, source = load_file(st_path), st_path
    else:
        raise ValueError(f"path: {path!r} holds neither config.yaml + model.ckpt (official layout) "
                         f"nor config.json + model.safetensors (worldsim layout)")
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = IBQ(config)
    _load_state(model, state, source)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def save_ibq(model: IBQ, path: str | os.PathLike, layout: str = "worldsim") -> None:
    """Write `model` to folder `path`: layout "worldsim" (config.json + model.safetensors) or
    "official" (config.yaml with top-level embed_dim/n_embed/ddconfig + model.ckpt {"state_dict": ...})."""
    if layout not in ("worldsim", "official"):
        raise ValueError(f"layout: must be 'worldsim' or 'official', got {layout!r}")
    cfg = model.config
    if layout == "official" and (cfg.norm_groups != 32 or cfg.patch_shortcut):  # refused before writing anything
        raise ValueError(f"layout: the official layout has no norm_groups or patch_shortcut field (it implies "
                         f"32 and none), got norm_groups={cfg.norm_groups}, patch_shortcut={cfg.patch_shortcut}; "
                         f"save with layout='worldsim'")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "worldsim":
        from safetensors.torch import save_file

        raw = {"model_type": MODEL_TYPE, **dataclasses.asdict(cfg)}
        raw.update(channel_mult=list(cfg.channel_mult), attn_resolutions=list(cfg.attn_resolutions))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)
        save_file(state, os.path.join(path, "model.safetensors"))
        return
    import yaml

    ddconfig = {"double_z": False, "dropout": cfg.dropout,
                **{src: getattr(cfg, ours) for ours, src in _OFFICIAL_DD.items()}}
    ddconfig.update(ch_mult=list(cfg.channel_mult), attn_resolutions=list(cfg.attn_resolutions))
    raw = {"embed_dim": cfg.embed_dim, "n_embed": cfg.codebook_size, "ddconfig": ddconfig}
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    torch.save({"state_dict": state}, os.path.join(path, "model.ckpt"))
