"""What every trainer shares: optimizer, LR schedule, precision, the step loop with its progress bar,
JSONL log and loss plot, run folders and resumable checkpoints, and config overrides from the CLI.

Defaults follow SPEC §7: AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, gradient clipping at 5.0,
cosine LR with linear warm-up, decaying from `lr` to `min_lr`. Weight decay applies to matrices and
embeddings only (parameters with 2+ dims), not to norm weights or conv biases, as usual for
transformers; the paper does not say.

Run folder (`out_dir`):
    log.jsonl                 one JSON object per logged step (step, loss, lr, grad_norm, tokens/s, ...)
    loss.png                  the loss curves of log.jsonl
    checkpoints/step_NNNNNN/  a resumable checkpoint: the trainer's model files (see each trainer),
                              trainer_state.pt (optimizer states, step, RNG; the LR and the data position follow from the step) and
                              train_config.json (the full config of the run, so `--resume` needs
                              nothing else)
    checkpoints/latest        the name of the newest complete checkpoint (written last)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable

import torch

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 5.0
PRECISIONS = ("auto", "fp32", "bf16")


# ------------------------------------------------------------------------------------ devices

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} requested but CUDA is not available here; use 'cpu'")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    raise ValueError(f"device: must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32. `auto`: bf16 on a CUDA device that has it, fp32 on CPU
    (CPU bf16 autocast is supported but usually slower than fp32 without AMX units)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision: 'bf16' requested but this CUDA device has no bf16")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------ optimization

def make_optimizer(named_params, lr: float, betas=BETAS, eps: float = EPS,
                   weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over `warmup_steps`,
    then cosine from lr to min_lr at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def check_schedule(*, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
    for name, v in (("lr", lr), ("min_lr", min_lr)):
        if not v >= 0:
            raise ValueError(f"{name}: must be >= 0, got {v}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps/steps: need warmup_steps >= 0 and steps > 0, got {warmup_steps}/{total_steps}")


def set_lr(optimizer, value: float) -> None:
    """The LR is a function of the step (cosine_lr), set before each optimizer step: nothing to save."""
    for group in optimizer.param_groups:
        group["lr"] = value


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip and return the total norm before clipping (DTensor norms of FSDP2 made full)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------ log and plot

class RunLog:
    """Appends JSON lines to out_dir/log.jsonl (main process only) and draws loss.png from them."""

    def __init__(self, out_dir: str, is_main: bool = True):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.plot_path = os.path.join(out_dir, "loss.png")
        self.is_main = is_main

    def truncate_after(self, step: int) -> None:
        """Drop entries past `step` (left by a run that died after its last checkpoint)."""
        if not self.is_main or not os.path.isfile(self.path):
            return
        kept = [e for e in self.read() if e.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, entry: dict) -> None:
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def plot(self, title: str = "") -> None:
        """loss.png: every `loss*` field of the log against the step; log-scale y when all values are > 0
        and span more than 20x."""
        if not self.is_main:
            return
        entries = self.read()
        keys = sorted({k for e in entries for k in e if k.startswith("loss")})
        if not keys:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        values = []
        for k in keys:
            pts = [(e["step"], e[k]) for e in entries if k in e and e[k] is not None and math.isfinite(e[k])]
            if pts:
                values += [v for _, v in pts]
                ax.plot(*zip(*pts), label=k, linewidth=1.2)
        if values and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.plot_path)
        plt.close(fig)


# ------------------------------------------------------------------------------------ checkpoints

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"step_{step:06d}")


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = os.path.join(out_dir, CKPT_DIR, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, CKPT_DIR, name)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"checkpoint: {pointer} names {path}, which has no {STATE_FILE}")
    return path


def write_checkpoint(out_dir: str, step: int, cfg, state: dict, write_model: Callable[[str], None],
                     keep: int = 2) -> str:
    """Main process only. Writes model files (via write_model(folder)), trainer state and config, then
    points `latest` at it and removes all but the `keep` newest checkpoints."""
    path = checkpoint_dir(out_dir, step)
    os.makedirs(path, exist_ok=True)
    write_model(path)
    torch.save(state, os.path.join(path, STATE_FILE))
    save_config(cfg, os.path.join(path, CONFIG_FILE))
    pointer = os.path.join(out_dir, CKPT_DIR, LATEST)
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(os.path.basename(path))
    os.replace(pointer + ".tmp", pointer)
    root = os.path.join(out_dir, CKPT_DIR)
    old = sorted(n for n in os.listdir(root) if n.startswith("step_"))[:-keep] if keep > 0 else []
    for name in old:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return path


def load_state(path: str) -> dict:
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint: {file} not found")
    return torch.load(file, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------ configs

def save_config(cfg, path: str) -> None:
    raw = {"config_type": type(cfg).__name__, **dataclasses.asdict(cfg)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)


def load_config(cls, path: str):
    """A config dataclass from a train_config.json (or a run/checkpoint folder holding one)."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path) if os.path.isdir(os.path.join(path, CKPT_DIR)) else None
        path = os.path.join(latest or path, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"config: {path} not found")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    kind = raw.pop("config_type", None)
    if kind != cls.__name__:
        raise ValueError(f"config: {path} is a {kind} config, expected {cls.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"config: {path} has unknown fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def apply_overrides(cfg, pairs: list[str]):
    """`field=value` strings -> a new config. Values are JSON when they parse (numbers, true, lists,
    objects, null), plain strings otherwise; lists become tuples."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set: expected field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        if key not in fields:
            raise ValueError(f"--set: unknown field {key!r}; allowed: {sorted(fields)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        changes[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------ the loop

def run_steps(*, start_step: int, total_steps: int, step_fn: Callable[[int], dict], log: RunLog,
              save_fn: Callable[[int], None], save_every: int, log_every: int = 1, is_main: bool = True,
              progress: bool = True, desc: str = "train") -> list[dict]:
    """Run optimizer steps start_step+1 .. total_steps. step_fn(step) trains one step and returns its
    metrics (must hold `loss`; `tokens` adds tokens/s). Saves every `save_every` steps and at the end;
    returns the logged entries of this call."""
    from tqdm import tqdm

    entries = []
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not (is_main and progress),
               dynamic_ncols=True)
    t_run = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        metrics = step_fn(step)
        dt = time.perf_counter() - t0
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss: became {metrics['loss']} at step {step}; lower lr or check the data")
        entry = {"step": step, **metrics, "step_s": round(dt, 4), "elapsed_s": round(time.perf_counter() - t_run, 3)}
        if "tokens" in metrics:
            entry["tokens_per_s"] = round(metrics["tokens"] / dt, 1)
        entries.append(entry)
        if step % log_every == 0 or step == total_steps:
            log.write(entry)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")
        bar.update(1)
        if (save_every and step % save_every == 0) or step == total_steps:
            save_fn(step)
    bar.close()
    return entries


def print_summary(compute: Callable[[], dict]) -> int:
    """Script edge of the data converters: print compute()'s summary as one JSON line and return 0, or
    print the ValueError to stderr and return 2."""
    import sys

    try:
        summary = compute()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
