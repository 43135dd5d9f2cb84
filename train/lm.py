"""The decoder trainer shared by pretraining and SFT (SPEC §7): packed next-token prediction with per-token
loss weights, document-masked attention, AdamW + cosine schedule, FSDP2 under torchrun.

Loss of one optimizer step over the global batch (all processes, all micro-batches):
    loss = sum_t w_t * CE(logits_{t-1}, id_t) / sum_t w_t
with w from train/data/format.py (pretrain: 1 for text, `visual_weight` for visual codes; SFT: the
answer only). Each process scales its share by world_size / sum(w over the global batch) before
backward, so FSDP2's gradient average equals the gradient of this loss: N processes take the same
step as one. `loss_text` / `loss_visual` are the unweighted mean CE over loss-bearing text / visual targets.

Attention: `dense` evaluates `document_mask_mod` into a (B, 1, T, T) bool mask (SDPA; works on every
device, O(T^2) memory); `flex` builds a FlexAttention BlockMask (for long rows on GPU; use it with
`compile=True`, uncompiled FlexAttention is slow, and it has no attention dropout).

Model files of a checkpoint are a `model.checkpoint.save_pretrained` folder (config.json, weights,
tokenizer), so `load_pretrained(run/checkpoints/step_N)` loads a trained model directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from train import common
from train import distributed as D

MODES = ("pretrain", "sft")
ATTENTION = ("dense", "flex")


@dataclass
class LMConfig:
    out_dir: str = "runs/pretrain"
    data: tuple[str, ...] = ()  # shard files or folders of shards
    mode: str = "pretrain"  # "pretrain" | "sft"
    model: str = "debug"  # preset name (model.config.PRESETS), ignored with init_from
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"dropout": 0.0}
    init_from: str | None = None  # a save_pretrained folder to start from
    tokenizer: str | None = None  # folder with tokenizer.json or emu3.tiktoken; default: init_from's
    vision_tokenizer: str | None = None  # IBQ folder for raw-image shards (None: debug preset, random);
    # each image is encoded the first time a run meets it: train.data.pretokenize does that once instead
    image_area: int = 256 * 256  # px, raw images are resized to about this area
    seq_len: int = 1024
    batch_size: int = 8  # rows per optimizer step, all processes together
    micro_batch_size: int = 0  # rows per forward on one process; 0: the whole per-process share
    visual_weight: float = 0.5
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 700
    weight_decay: float = common.WEIGHT_DECAY
    betas: tuple[float, float] = common.BETAS
    eps: float = common.EPS
    grad_clip: float = common.GRAD_CLIP
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # "auto" | "fp32" | "bf16"
    attention: str = "dense"  # "dense" | "flex"
    compile: bool = False
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    repeat_first_batch: bool = False  # train on the first batch only (overfitting checks)
    progress: bool = True
    dida_weight: float = 0.0  # > 0: DiDA adaptation (model/dida.py): a noisy copy of every image, its loss added
    dida_steps: int = 8  # parallel steps the adapted checkpoint decodes with by default (its config's dida_steps)
    scheduled_sampling: float = 0.0  # > 0: this share of the loss-bearing input codes is the model's own (_own_codes)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {list(MODES)}, got {self.mode!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention: must be one of {list(ATTENTION)}, got {self.attention!r}")
        if not self.data:
            raise ValueError("data: give at least one shard file or folder (see train/data/format.py)")
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.dida_weight < 0 or self.dida_steps < 1:
            raise ValueError(f"dida_weight/dida_steps: need >= 0 and >= 1, got {self.dida_weight}, {self.dida_steps}")
        if not 0 <= self.scheduled_sampling <= 1:
            raise ValueError(f"scheduled_sampling: a share in [0, 1], got {self.scheduled_sampling}")
        if self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size: must be >= 0, got {self.micro_batch_size}")


# ------------------------------------------------------------------------------------ tokenizers

def load_text_tokenizer(path: str, num_text_tokens: int, codebook_size: int):
    """A tokenizer folder (emu3.tiktoken + emu3_vision_tokens.txt, or tokenizer.json) or a tokenizer.json
    file, checked against the model's vocabulary layout: a mismatch is a ValueError naming both sizes."""
    from model.text_tokenizer import BPE_FILE, TIKTOKEN_FILE, BPETokenizer, TiktokenTokenizer

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, TIKTOKEN_FILE)):
        tok = TiktokenTokenizer.from_dir(path)
        size, codes = tok.vocab.num_text_tokens, tok.vocab.codebook_size
    else:
        file = os.path.join(path, BPE_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"tokenizer: {path} holds neither {TIKTOKEN_FILE} nor {BPE_FILE}")
        from tokenizers import Tokenizer

        size, codes = Tokenizer.from_file(file).get_vocab_size(), codebook_size
        if size != num_text_tokens:
            raise ValueError(f"tokenizer: {file} has {size} text tokens but the model's num_text_tokens is "
                             f"{num_text_tokens}; train the BPE to that size (python -m train.text_bpe) "
                             "or pick the matching model preset")
        tok = BPETokenizer.from_file(file, num_text_tokens, codebook_size)
    if (size, codes) != (num_text_tokens, codebook_size):
        raise ValueError(f"tokenizer: {path} has {size} text tokens and {codes} visual codes but the model has "
                         f"num_text_tokens={num_text_tokens}, codebook_size={codebook_size}")
    return tok


# ------------------------------------------------------------------------------------ model

def _build_model(cfg: LMConfig, resume_dir: str | None):
    from model.checkpoint import load_pretrained, read_config
    from model.config import preset
    from model.transformer import Transformer

    source = resume_dir or resolve_init(cfg.init_from)
    if source:
        base_config, saved_tok = read_config(source)
    else:
        base_config, saved_tok = preset(cfg.model), None
    config = base_config.replace(**cfg.model_overrides) if cfg.model_overrides else base_config
    if cfg.dida_weight > 0:  # the checkpoint says it is adapted, so the engine decodes images with DiDA
        config = config.replace(dida_steps=cfg.dida_steps)
    tok_path = cfg.tokenizer
    if tok_path is None and source is None:
        raise ValueError("tokenizer: give a tokenizer folder (python -m train.text_bpe writes one) or init_from")
    tokenizer = load_text_tokenizer(tok_path, config.num_text_tokens, config.codebook_size) if tok_path \
        else saved_tok
    if tokenizer is None:
        raise ValueError(f"tokenizer: {source} has no tokenizer files; pass tokenizer=")
    torch.manual_seed(cfg.seed)
    model = Transformer(config)
    if source:
        model.load_state_dict(load_pretrained(source).state_dict())
    model.vocab, model.tokenizer = tokenizer.vocab, tokenizer
    return model, config, tokenizer


def resolve_init(path: str | None) -> str | None:
    """A save_pretrained folder, or a run folder (its latest checkpoint)."""
    if path and os.path.isdir(os.path.join(path, common.CKPT_DIR)):
        latest = common.latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"init_from: run folder {path} has no complete checkpoint yet")
        return latest
    return path


def _save_model_files(state: dict, config, tokenizer, path: str) -> None:
    from model.checkpoint import save_pretrained
    from model.transformer import Transformer

    with torch.device("meta"):
        m = Transformer(config)
    m.load_state_dict(state, assign=True, strict=True)
    m.vocab, m.tokenizer = tokenizer.vocab, tokenizer
    save_pretrained(m, path)


# ------------------------------------------------------------------------------------ data

def make_stream(cfg: LMConfig, tokenizer, config):
    from train.data.format import encode_record, read_header, shard_paths
    from train.data.pack import PackedStream

    shards = shard_paths(cfg.data)
    for path in shards:
        cb = read_header(path).get("codebook_size")
        if cb is not None and cb != config.codebook_size:
            raise ValueError(f"shard: {path} holds codes of a {cb}-code IBQ but the model's codebook_size is "
                             f"{config.codebook_size}")
    cache, ibq = {}, []

    def codes_of(path: str):
        if path not in cache:
            from train.data.vision import image_codes, load_vision_tokenizer

            if not ibq:
                ibq.append(load_vision_tokenizer(cfg.vision_tokenizer, config.codebook_size))
            cache[path] = image_codes(ibq[0], path, cfg.image_area)
        return cache[path]

    def encode(rec):
        return encode_record(rec, tokenizer, mode=cfg.mode, visual_weight=cfg.visual_weight, image_codes=codes_of)

    return PackedStream(shards, encode, cfg.seq_len, tokenizer.vocab.pad, seed=cfg.seed)


def make_mask(doc_ids: torch.Tensor, attention: str, dida: dict | None = None):
    """Causal-per-document attention, or DiDA's pattern when `dida` (model.dida.add_noisy_copies) is given."""
    from model.attention import block_from_mask_mod, dense_from_mask_mod, document_mask_mod
    from model.dida import training_mask_mod

    B, T = doc_ids.shape
    mm = training_mask_mod(doc_ids, dida["noisy_image"], dida["limit"]) if dida else document_mask_mod(doc_ids)
    if attention == "flex":
        return block_from_mask_mod(mm, B, T, T, doc_ids.device)
    return dense_from_mask_mod(mm, B, T, T, doc_ids.device)


def _own_codes(model, inputs, mask, positions, targets, w, share: float, vocab) -> tuple[torch.Tensor, int]:
    """Parallel scheduled sampling (Duckworth et al., 2019): one forward without gradient over the true
    sequence gives the model's argmax code at every position; each loss-bearing visual input code (a code
    whose own prediction is trained, weight > 0) is swapped for it with probability `share`. The targets
    stay the true codes, so the model learns to draw the rest of an image from a prefix holding mistakes
    of its own kind, as it does when it generates. Codes of every answer image are swapped, so later
    images (and DiDA's noisy copies, which see the clean tokens before their image) also meet an imperfect
    history. `inputs` may carry DiDA's noisy copies after the clean T tokens; only clean codes are
    swapped. Returns the new inputs and how many codes changed."""
    lo, hi = vocab.visual_start, vocab.size
    T = targets.shape[1] + 1
    with torch.no_grad():  # the head only where a guess is read (not DiDA's copies) and only over the codes
        score = torch.arange(T - 1, device=inputs.device)
        guess = model(inputs, mask=mask, positions=positions, score=score, vocab_range=(lo, hi)).argmax(-1) + lo
    eligible = (targets >= lo) & (targets < hi) & (w > 0)
    swap = eligible & (torch.rand(targets.shape, device=targets.device) < share)
    out = inputs.clone()
    out[:, 1:T] = torch.where(swap, guess, targets)
    return out, int((swap & (guess != targets)).sum())


# ------------------------------------------------------------------------------------ training

def train(cfg: LMConfig) -> list[dict]:
    """Run (or resume) a training run; returns this call's logged entries (on every rank)."""
    cfg.check()
    device = common.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = D.init(device.type)
    try:
        return _train(cfg, device, info)
    finally:
        D.close(info)


def _train(cfg: LMConfig, device, info: D.DistInfo) -> list[dict]:
    resume_dir = common.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    model, config, tokenizer = _build_model(cfg, resume_dir)
    stream = make_stream(cfg, tokenizer, config)
    amp = common.autocast_dtype(device, cfg.precision)
    model.to(device).train()
    D.shard(model, list(model.model.layers), info, param_dtype=amp if device.type == "cuda" else None)
    if cfg.compile:
        model.compile()
    optimizer = common.make_optimizer(model.named_parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    schedule = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    common.check_schedule(**schedule)
    start = 0
    log = common.RunLog(cfg.out_dir, info.is_main)
    if resume_dir:
        state = common.load_state(resume_dir)
        D.load_optimizer_state(model, optimizer, state["optimizer"])
        start = state["step"]
        rng = state.get("rng") or []
        if len(rng) == info.world_size:
            torch.set_rng_state(rng[info.rank])
        log.truncate_after(start)
        if info.is_main:
            print(f"[train] resuming from {resume_dir} at step {start}")
    else:
        log.truncate_after(0)
        torch.manual_seed(cfg.seed + 1000 * info.rank)  # dropout streams differ per rank
    if start >= cfg.steps:
        return []

    local = cfg.batch_size // info.world_size
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size: {cfg.batch_size} must be divisible by the {info.world_size} processes")
    micro = cfg.micro_batch_size or local
    batches = stream.batches(cfg.batch_size, info.rank, info.world_size, skip=0 if cfg.repeat_first_batch else start)
    first = next(batches) if cfg.repeat_first_batch else None
    V = config.vocab_size

    def step_fn(step: int) -> dict:
        batch = (first if first is not None else next(batches)).to(device)
        w_all = batch.weights[:, 1:]
        sums = torch.stack([w_all.sum(), torch.tensor(float(batch.num_tokens), device=device)]).double()
        D.all_reduce_sum(sums, info)
        denom = float(sums[0])
        if denom <= 0:
            raise ValueError("data: a global batch has no loss-bearing tokens (SFT records without answers?)")
        dida = None
        if cfg.dida_weight > 0:  # noisy copies of the images, appended after the T clean tokens
            from model.dida import add_noisy_copies

            dida = add_noisy_copies(batch.ids, batch.positions, batch.doc_ids, tokenizer.vocab)
            n_noisy = (dida["targets"] >= 0).sum().double().reshape(1)
            D.all_reduce_sum(n_noisy, info)
            n_noisy = max(float(n_noisy[0]), 1.0)
        # [weighted CE sum, text CE sum, text count, visual CE sum, visual count, DiDA CE sum, own codes]
        acc = torch.zeros(7, dtype=torch.float64, device=device)
        T = batch.ids.shape[1]
        for lo in range(0, batch.ids.shape[0], micro):
            ids, w = batch.ids[lo:lo + micro], batch.weights[lo:lo + micro, 1:]
            part = {k: v[lo:lo + micro] for k, v in dida.items()} if dida else None
            mask = make_mask(part["doc_ids"] if part else batch.doc_ids[lo:lo + micro], cfg.attention, part)
            inputs = part["ids"] if part else ids
            positions = part["positions"] if part else batch.positions[lo:lo + micro]
            target = ids[:, 1:]
            with common.autocast(device, amp):
                if cfg.scheduled_sampling > 0:
                    inputs, changed = _own_codes(model, inputs, mask, positions, target, w, cfg.scheduled_sampling,
                                                 tokenizer.vocab)
                    acc[6] += changed
                logits = model(inputs, mask=mask, positions=positions)  # (b, T', V)
            ce = F.cross_entropy(logits[:, :T - 1].float().reshape(-1, V), target.reshape(-1),
                                 reduction="none").view_as(w)  # (b, T-1)
            weighted = (ce * w).sum()
            loss = weighted * (info.world_size / denom)
            if part:  # each noisy, masked code predicts its clean code at its own position
                dida_ce = F.cross_entropy(logits[:, T:].float().reshape(-1, V), part["targets"].reshape(-1),
                                          ignore_index=-100, reduction="sum")
                loss = loss + cfg.dida_weight * dida_ce * (info.world_size / n_noisy)
                acc[5] += dida_ce.detach().double()
            loss.backward()
            with torch.no_grad():
                is_vis = (target >= tokenizer.vocab.visual_start) & (w > 0)
                is_txt = (target < tokenizer.vocab.visual_start) & (w > 0)
                acc[:5] += torch.stack([weighted.detach(), (ce * is_txt).sum(), is_txt.sum(),
                                        (ce * is_vis).sum(), is_vis.sum()]).double()
        D.all_reduce_sum(acc, info)
        grad_norm = common.clip_grad_norm(model.parameters(), cfg.grad_clip)
        lr = common.cosine_lr(step - 1, **schedule)
        common.set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out = {"loss": float(acc[0]) / denom, "lr": lr, "grad_norm": round(grad_norm, 4), "tokens": int(sums[1])}
        if acc[2] > 0:
            out["loss_text"] = float(acc[1] / acc[2])
        if acc[4] > 0:
            out["loss_visual"] = float(acc[3] / acc[4])
        if dida is not None:
            out["loss_dida"] = float(acc[5]) / n_noisy
        if cfg.scheduled_sampling > 0 and acc[4] > 0:  # share of the trained visual inputs that were wrong codes
            out["own_codes"] = round(float(acc[6] / acc[4]), 4)
        return out

    def save_fn(step: int) -> None:
        model_sd = D.model_state(model)
        optim_sd = D.optimizer_state(model, optimizer)
        rng = D.gather_objects(torch.get_rng_state(), info)
        if info.is_main:
            state = {"step": step, "optimizer": optim_sd, "rng": rng}
            common.write_checkpoint(cfg.out_dir, step, cfg, state,
                                    lambda path: _save_model_files(model_sd, config, tokenizer, path),
                                    keep=cfg.keep_checkpoints)
            log.plot(f"{cfg.mode} ({config.num_layers} layers, hidden {config.hidden_size})")
        D.barrier(info)

    if info.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(f"[train] {cfg.mode}: {n / 1e6:.2f}M params, device {device}, "
              f"{info.world_size} process(es), precision {amp or torch.float32}, steps {start}->{cfg.steps}")
    return common.run_steps(start_step=start, total_steps=cfg.steps, step_fn=step_fn, log=log, save_fn=save_fn,
                            save_every=cfg.save_every, log_every=cfg.log_every, is_main=info.is_main,
                            progress=cfg.progress, desc=cfg.mode)


def cli(argv, *, default_recipe: str, recipes: dict, description: str) -> LMConfig:
    """Shared argument parsing of train/pretrain.py and train/sft.py (arguments are parsed here only)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--recipe", default=default_recipe, choices=sorted(recipes))
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run with the config its checkpoint carries")
    p.add_argument("--data", nargs="+", help="shard files or folders")
    p.add_argument("--out", help="run folder (out_dir)")
    p.add_argument("--tokenizer")
    p.add_argument("--init-from")
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="any other config field")
    a = p.parse_args(argv)
    cfg = common.load_config(LMConfig, a.resume) if a.resume else recipes[a.recipe]()
    if a.resume:
        cfg = dataclasses.replace(cfg, out_dir=a.resume, resume=True)
    for name, value in (("data", tuple(a.data) if a.data else None), ("out_dir", a.out),
                        ("tokenizer", a.tokenizer), ("init_from", a.init_from), ("steps", a.steps),
                        ("device", a.device)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    return common.apply_overrides(cfg, a.set)
