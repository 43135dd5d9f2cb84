"""Images -> IBQ code grids for the data converters and for raw-image shards (SPEC §4 preprocessing:
bicubic resize to a target area keeping the aspect ratio, sides rounded to multiples of the
tokenizer's downsample factor, pixels x/127.5 - 1)."""

from __future__ import annotations

import sys

import torch

DEFAULT_IMAGE_AREA = 256 * 256


def load_vision_tokenizer(path: str | None, codebook_size: int | None = None, device: str = "cpu"):
    """load_ibq(path), or without a path the `debug` preset with random weights (and a warning on stderr:
    its codes carry no meaning). codebook_size, when given, must equal the tokenizer's."""
    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq

    if path:
        ibq = load_ibq(path, device=device)
    else:
        print("warning: no --vision-tokenizer given: tokenizing images with the IBQ 'debug' preset and "
              "RANDOM weights (seed 0); the codes are only good for testing the pipeline", file=sys.stderr)
        torch.manual_seed(0)
        ibq = IBQ(ibq_preset("debug")).to(device).eval()
    if codebook_size is not None and ibq.config.codebook_size != codebook_size:
        raise ValueError(f"vision tokenizer: codebook_size {ibq.config.codebook_size} does not match the "
                         f"expected {codebook_size}")
    return ibq


def _pixels(ibq, image, image_area: int) -> torch.Tensor:
    """A PIL image or an image file path -> (3, H, W) in [-1, 1] at about image_area px (SPEC §4)."""
    from PIL import Image, UnidentifiedImageError

    from model.vision_tokenizer import resize_to_area, to_tensor

    if isinstance(image, str):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"image: cannot read {image} ({e})") from None
    return to_tensor(resize_to_area(image.convert("RGB"), image_area, ibq.config.downsample_factor))


def image_codes(ibq, image, image_area: int = DEFAULT_IMAGE_AREA) -> list[list[int]]:
    """A PIL image or an image file path -> (h, w) codes as nested lists."""
    x = _pixels(ibq, image, image_area)[None].to(next(ibq.parameters()).device)  # (1, 3, H, W)
    return ibq.encode(x)[0].tolist()  # (h, w)


@torch.no_grad()
def many_image_codes(ibq, images: list, image_area: int = DEFAULT_IMAGE_AREA, batch_size: int = 32) -> list:
    """image_codes for many images, encoded in batches of equal-size images (the IBQ normalises each
    image on its own, so batching changes only float rounding)."""
    device = next(ibq.parameters()).device
    out: list = [None] * len(images)
    by_size: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, image in enumerate(images):
        x = _pixels(ibq, image, image_area)
        group = by_size.setdefault(tuple(x.shape), [])
        group.append((i, x))
        if len(group) == batch_size:
            _encode_group(ibq, group, out, device)
            group.clear()
    for group in by_size.values():
        _encode_group(ibq, group, out, device)
    return out


def _encode_group(ibq, group, out, device) -> None:
    if group:
        codes = ibq.encode(torch.stack([x for _, x in group]).to(device))
        for (i, _), c in zip(group, codes):
            out[i] = c.tolist()
