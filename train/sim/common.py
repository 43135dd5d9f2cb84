"""Shared pieces of the simulator generators: frame files, seeded RNGs, episode bookkeeping.

Every generator is a pure function of (split, seed, episode index): the episode's RNG is
`numpy.random.default_rng([seed, index])` and the simulator is seeded from it, so the same arguments
give byte-identical PNGs and shards. Frames are written as PNG files next to the shards and referenced
by relative paths (`{"path": ...}` images), to be tokenized by the trained IBQ at training time.
"""

from __future__ import annotations

import os

import numpy as np

SPLITS = ("train", "heldout")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")
    return split


def check_episodes(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"episodes: must be a positive integer, got {n!r}")
    return n


def episode_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def save_png(array: np.ndarray, path: str) -> str:
    """uint8 (H, W, 3) -> PNG at `path` (folders made). PNG via Pillow with fixed settings, so the bytes
    depend only on the pixels."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8)).save(path, format="PNG", optimize=False)
    return path


class FrameWriter:
    """Writes an episode's frames as out_dir/frames/{episode}/{k:03d}.png and returns shard-relative paths."""

    def __init__(self, out_dir: str, episode: str):
        self.out_dir, self.episode, self.count = out_dir, episode, 0

    def __call__(self, array: np.ndarray, name: str | None = None) -> str:
        rel = os.path.join("frames", self.episode, f"{name or f'{self.count:03d}'}.png")
        save_png(array, os.path.join(self.out_dir, rel))
        self.count += 1
        return rel


def image(rel: str) -> dict:
    return {"path": rel}


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8-range images (H, W, 3); `mask` (H, W) bool restricts the pixels. Capped at 100."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if mask is not None:
        if not mask.any():
            return float("nan")
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2))
    return 100.0 if mse <= 1e-10 else float(10 * np.log10(255.0 ** 2 / mse))
