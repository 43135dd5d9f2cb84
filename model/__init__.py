"""Networks and the math that turns logits into tokens and frames (see shared/DESIGN.md)."""

from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig, preset

__all__ = ["ModelConfig", "load_pretrained", "preset", "save_pretrained"]
