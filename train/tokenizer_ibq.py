"""Trainer of the IBQ vision tokenizer (SPEC §4, paper §5.2): reconstruction (L1), quantization (beta 0.25,
from `IBQ.forward`), perceptual, PatchGAN adversarial and entropy losses; see train/ibq_losses.py for the
offline perceptual loss and the other choices.

    python -m train.tokenizer_ibq --recipe debug_cpu --images DIR [DIR ...] --out runs/ibq
    python -m train.tokenizer_ibq --resume runs/ibq --steps 2000

Images: files or folders (searched recursively for png/jpg/jpeg/webp/bmp). Each step draws `batch_size`
images with a generator seeded by (seed, step), so a resumed run sees what the uninterrupted one would;
each is upscaled if its short side is under `resolution`, randomly cropped to resolution x resolution and
randomly flipped. A checkpoint's model files are a `save_ibq` folder (`load_ibq` reads it); the
discriminator lives in trainer_state.pt.

Quantizer training (`quantizer`): "index_propagation" is IBQ's own (straight-through through the softmax
of the code logits). With few CPU steps it collapsed here: the softmax over 2,048 codes stays near flat, so
the encoder gets almost no reconstruction gradient and the decoder learns to ignore the codes. "cosine"
trains the same inference rule (code = argmax of z·e) with unit-length codebook rows, renormalised after
every step, so the argmax is the cosine-nearest row: the decoder's gradient passes straight to the
(normalised) encoder output, the codebook and commitment losses pull rows and outputs together, and every
`restart_every` steps the rows no position chose since the last restart are re-seeded from this batch's
encoder outputs. The saved codebook is unit-length, so `IBQ.encode` / `decode` are unchanged. The record of
used rows is not checkpointed: a run resumed between two restarts re-seeds slightly more rows at the next.

Decoder-only fine-tuning (`decoder_only=true`, with `init_from` a trained tokenizer): the encoder, the
codebook and the pixel-to-latent patch path are frozen, so every image keeps exactly the codes it had and
a world model trained on them stays valid; only the path from codes to pixels (post_quant_conv, decoder,
patch_out) learns. This is the paper's route to better pixels from the same tokens (its diffusion image
decoder "takes the same quantized tokens as input"), here with the tokenizer's own decoder and losses.

Optimizers: AdamW with SPEC §7's betas, eps and clipping; lr 1e-4 and no weight decay by default (a conv
autoencoder with a GAN is not a transformer; the tokenizer's values are not given by the paper).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train import common
from train import distributed as D
from train.ibq_losses import PatchDiscriminator, entropy_loss, hinge_d_loss, hinge_g_loss, structure_loss

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class IBQTrainConfig:
    out_dir: str = "runs/ibq"
    images: tuple[str, ...] = ()
    preset: str = "debug"  # model.vision_tokenizer.ibq_preset name; ignored with init_from
    init_from: str | None = None  # a load_ibq folder
    resolution: int = 64  # crop side in px, a multiple of the downsample factor
    batch_size: int = 8  # all processes together
    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = common.BETAS
    eps: float = common.EPS
    grad_clip: float = common.GRAD_CLIP
    rec_weight: float = 1.0
    quant_weight: float = 1.0
    perceptual_weight: float = 1.0
    entropy_weight: float = 0.05
    quantizer: str = "index_propagation"  # or "cosine" (see the module docstring)
    decoder_only: bool = False  # freeze encoder and codebook: codes never change (see the module docstring)
    restart_every: int = 50  # cosine: steps between dead-code restarts (0 = never)
    entropy_temperature: float = 0.01
    disc_weight: float = 0.1
    disc_start: int = 500  # steps before the adversarial loss switches on
    disc_channels: int = 64
    disc_layers: int = 3
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    resume: bool = True
    repeat_first_batch: bool = False
    progress: bool = True


def debug_cpu() -> IBQTrainConfig:
    return IBQTrainConfig(out_dir="runs/ibq-debug", preset="debug", resolution=64, batch_size=8, steps=300,
                          lr=2e-4, warmup_steps=20, disc_start=100, disc_channels=32, save_every=100)


def demo_cpu() -> IBQTrainConfig:
    return IBQTrainConfig(out_dir="runs/ibq-demo", preset="demo", resolution=128, batch_size=8, steps=20000,
                          lr=1e-4, warmup_steps=500, disc_start=5000, save_every=1000)


RECIPES = {f.__name__: f for f in (debug_cpu, demo_cpu)}


# ------------------------------------------------------------------------------------ data

def image_files(paths) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"images: {p} not found")
    if not files:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {list(paths)}")
    return sorted(files)


def load_crop(path: str, resolution: int, g: torch.Generator) -> torch.Tensor:
    """One training crop (3, R, R) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    from model.vision_tokenizer import to_tensor

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"images: cannot read {path} ({e})") from None
    w, h = im.size
    if min(w, h) < resolution:
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
        w, h = im.size
    x0 = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
    y0 = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
    x = to_tensor(im.crop((x0, y0, x0 + resolution, y0 + resolution)))
    return x.flip(-1) if bool(torch.rand((), generator=g) < 0.5) else x


def batch_for_step(files: list[str], step: int, cfg: IBQTrainConfig, info: D.DistInfo) -> torch.Tensor:
    """This process's share of step `step`'s global batch, (b, 3, R, R)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    picks = torch.randint(0, len(files), (cfg.batch_size,), generator=g).tolist()
    crops = [load_crop(files[i], cfg.resolution, g) for i in picks]  # every rank draws all: same stream
    return torch.stack(crops[info.rank::info.world_size])


# ------------------------------------------------------------------------------------ model

class TrainForward(nn.Module):
    """The generator side of one step as one module, so FSDP2 gathers the tokenizer's parameters once:
    images (B, 3, H, W) -> reconstruction (B, 3, H, W), quantization loss, entropy loss, codes (B, h, w),
    normalised encoder outputs (B*h*w, D) or None. The entropy is computed here so the (B, h, w, N) code
    logits never leave the module."""

    def __init__(self, ibq, entropy_temperature: float, quantizer: str = "index_propagation",
                 decoder_only: bool = False):
        super().__init__()
        self.ibq = ibq
        self.entropy_temperature = entropy_temperature
        self.quantizer = quantizer
        self.decoder_only = decoder_only
        if decoder_only:
            for part in self.frozen_parts():
                part.requires_grad_(False)

    def frozen_parts(self) -> list[nn.Module]:
        """What decoder-only training keeps fixed: everything that decides a code."""
        parts = [self.ibq.encoder, self.ibq.quant_conv, self.ibq.quantize]
        return parts + ([self.ibq.patch_in] if self.ibq.config.patch_shortcut else [])

    def forward(self, x: torch.Tensor):
        q = self.ibq.quantize
        if self.decoder_only:  # the inference rule exactly: IBQ.encode, then the codebook rows
            codes = self.ibq.encode(x)
            zero = x.new_zeros(())
            return self.ibq.reconstruct(q.lookup(codes)), zero, zero, codes, None
        z = self.ibq.latents(x)  # (B, D, h, w)
        if self.quantizer == "cosine":
            z = F.normalize(z, dim=1)
            logits = q.logits(z)  # rows are unit-length: argmax = cosine-nearest row
            codes = logits.argmax(-1)
            e = q.lookup(codes)
            qloss = q.beta * F.mse_loss(z, e.detach()) + F.mse_loss(e, z.detach())
            z_q = z + (e - z).detach()
            flat = z.detach().permute(0, 2, 3, 1).flatten(0, 2)
        else:
            z_q, codes, qloss = q(z)
            logits, flat = q.logits(z), None
        entropy = entropy_loss(logits, self.entropy_temperature)  # logits (B, h, w, N)
        return self.ibq.reconstruct(z_q), qloss, entropy, codes, flat


class CodebookKeeper:
    """For the cosine quantizer: keeps the codebook rows unit-length and re-seeds rows unused since the
    last restart from random encoder outputs of the current batch (plus a little noise)."""

    def __init__(self, embedding: torch.Tensor, restart_every: int, seed: int):
        self.weight = embedding
        self.restart_every = restart_every
        self.used = torch.zeros(embedding.shape[0], dtype=torch.bool, device=embedding.device)
        self.g = torch.Generator(device="cpu").manual_seed(seed)
        self.restarted = 0
        self.normalise()

    @torch.no_grad()
    def normalise(self) -> None:
        self.weight.copy_(F.normalize(self.weight.float(), dim=1).to(self.weight.dtype))

    @torch.no_grad()
    def after_step(self, step: int, codes: torch.Tensor, flat: torch.Tensor) -> None:
        self.used[codes.flatten()] = True
        if self.restart_every and step % self.restart_every == 0:
            dead = (~self.used).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, flat.shape[0], (len(dead),), generator=self.g).to(flat.device)
                noise = torch.randn(len(dead), flat.shape[1], generator=self.g).to(flat.device) * 0.05
                self.weight[dead] = (flat[pick] + noise).to(self.weight.dtype)
            self.restarted = len(dead)
            self.used.zero_()
        self.normalise()


def main(cfg: IBQTrainConfig) -> list[dict]:
    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq, save_ibq

    device = common.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = D.init(device.type)
    try:
        files = image_files(cfg.images)
        resume_dir = common.latest_checkpoint(cfg.out_dir) if cfg.resume else None
        if info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        torch.manual_seed(cfg.seed)
        source = resume_dir or cfg.init_from
        ibq = load_ibq(source) if source else IBQ(ibq_preset(cfg.preset))
        f = ibq.config.downsample_factor
        if cfg.resolution % f:
            raise ValueError(f"resolution: must be a multiple of the tokenizer's downsample factor {f}, "
                             f"got {cfg.resolution}")
        if cfg.batch_size % info.world_size:
            raise ValueError(f"batch_size: {cfg.batch_size} must be divisible by the {info.world_size} processes")
        disc = PatchDiscriminator(ibq.config.out_channels, cfg.disc_channels, cfg.disc_layers)
        state = common.load_state(resume_dir) if resume_dir else None
        if state:
            disc.load_state_dict(state["discriminator"])
        if cfg.quantizer not in ("index_propagation", "cosine"):
            raise ValueError(f"quantizer: must be 'index_propagation' or 'cosine', got {cfg.quantizer!r}")
        if cfg.decoder_only and not source:
            raise ValueError("decoder_only: needs a trained tokenizer to keep the codes of (init_from or resume)")
        gen = TrainForward(ibq.to(device).train(), cfg.entropy_temperature, cfg.quantizer, cfg.decoder_only)
        disc.to(device).train()
        D.shard(gen, [], info)
        D.shard(disc, [], info)
        amp = common.autocast_dtype(device, cfg.precision)
        opt_g = common.make_optimizer(gen.named_parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        opt_d = common.make_optimizer(disc.named_parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        schedule = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        common.check_schedule(**schedule)
        log = common.RunLog(cfg.out_dir, info.is_main)
        start = 0
        if state:
            D.load_optimizer_state(gen, opt_g, state["optimizer_g"])
            D.load_optimizer_state(disc, opt_d, state["optimizer_d"])
            start = state["step"]
            log.truncate_after(start)
            if info.is_main:
                print(f"[train] resuming from {resume_dir} at step {start}")
        else:
            log.truncate_after(0)
        if start >= cfg.steps:
            return []
        first = batch_for_step(files, 1, cfg, info) if cfg.repeat_first_batch else None
        keeper = None
        if cfg.quantizer == "cosine" and not cfg.decoder_only:  # a frozen codebook needs no keeper
            if info.world_size > 1:
                raise ValueError("quantizer: 'cosine' keeps its codebook on one process; run it without torchrun")
            keeper = CodebookKeeper(ibq.quantize.embedding.weight, cfg.restart_every, cfg.seed + start)

        def step_fn(step: int) -> dict:
            x = (first if first is not None else batch_for_step(files, step, cfg, info)).to(device)
            adversarial = step > cfg.disc_start and cfg.disc_weight > 0
            with common.autocast(device, amp):
                recon, qloss, ent, codes, flat = gen(x)
                rec = (recon.float() - x).abs().mean()
                perc = structure_loss(recon, x)
                g_adv = hinge_g_loss(disc(recon).float()) if adversarial else recon.new_zeros(()).float()
            loss = (cfg.rec_weight * rec + cfg.quant_weight * qloss.float() + cfg.perceptual_weight * perc
                    + cfg.entropy_weight * ent + cfg.disc_weight * g_adv)
            # FSDP2 averages gradients over ranks and each rank's loss is its share's mean: the average
            # is the global batch's mean.
            loss.backward()
            grad_norm = common.clip_grad_norm(gen.parameters(), cfg.grad_clip)
            lr = common.cosine_lr(step - 1, **schedule)
            common.set_lr(opt_g, lr)
            common.set_lr(opt_d, lr)
            opt_g.step()
            if keeper is not None:
                keeper.after_step(step, codes, flat)
            opt_d.zero_grad(set_to_none=True)  # the generator's backward reached the discriminator too
            if cfg.disc_weight > 0:
                with torch.set_grad_enabled(adversarial), common.autocast(device, amp):
                    d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
            else:
                d_loss = rec.new_zeros(()).float()
            if adversarial:
                d_loss.backward()
                common.clip_grad_norm(disc.parameters(), cfg.grad_clip)
                opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            parts = torch.stack([loss.detach(), rec.detach(), qloss.detach().float(), perc.detach(),
                                 ent.detach(), g_adv.detach(), d_loss.detach()]).double()
            D.all_reduce_sum(parts, info)
            parts /= info.world_size
            names = ("loss", "loss_rec", "loss_quant", "loss_perceptual", "loss_entropy", "loss_g_adv", "loss_disc")
            out = {k: float(v) for k, v in zip(names, parts)}
            if not adversarial:
                out.pop("loss_g_adv")
            if keeper is not None:
                out["codes_in_batch"] = int(codes.unique().numel())
                out["restarted"] = keeper.restarted
            return {**out, "lr": lr, "grad_norm": round(grad_norm, 4)}

        def save_fn(step: int) -> None:
            ibq_sd = D.model_state(gen)
            disc_sd = D.model_state(disc)
            og, od = D.optimizer_state(gen, opt_g), D.optimizer_state(disc, opt_d)
            if info.is_main:
                def write_model(path):
                    with torch.device("meta"):
                        m = IBQ(ibq.config)
                    m.load_state_dict({k.removeprefix("ibq."): v for k, v in ibq_sd.items()}, assign=True)
                    save_ibq(m, path)

                st = {"step": step, "discriminator": disc_sd, "optimizer_g": og, "optimizer_d": od}
                common.write_checkpoint(cfg.out_dir, step, cfg, st, write_model, keep=cfg.keep_checkpoints)
                log.plot(f"IBQ tokenizer ({cfg.preset if not cfg.init_from else cfg.init_from})")
            D.barrier(info)

        return common.run_steps(start_step=start, total_steps=cfg.steps, step_fn=step_fn, log=log,
                                save_fn=save_fn, save_every=cfg.save_every, log_every=cfg.log_every,
                                is_main=info.is_main, progress=cfg.progress, desc="ibq")
    finally:
        D.close(info)


def cli(argv) -> IBQTrainConfig:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="debug_cpu", choices=sorted(RECIPES))
    p.add_argument("--resume", metavar="RUN_DIR")
    p.add_argument("--images", nargs="+")
    p.add_argument("--out")
    p.add_argument("--init-from")
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    a = p.parse_args(argv)
    cfg = common.load_config(IBQTrainConfig, a.resume) if a.resume else RECIPES[a.recipe]()
    if a.resume:
        cfg = dataclasses.replace(cfg, out_dir=a.resume, resume=True)
    for name, value in (("images", tuple(a.images) if a.images else None), ("out_dir", a.out),
                        ("init_from", a.init_from), ("steps", a.steps), ("device", a.device)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    return common.apply_overrides(cfg, a.set)


if __name__ == "__main__":
    main(cli(sys.argv[1:]))
