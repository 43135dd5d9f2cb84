"""Worldsim entry point: `python app.py`.

Today it runs one streaming turn of the decoder end to end and writes the images it makes; the
browser UI (Gradio) and the session engine replace this with their own front end (issues 6 and 3).
Without `--checkpoint` it uses the `debug` preset with RANDOM weights and the built-in BPE: the
pipeline (prompt template, FSM, guidance, IBQ decode) is real, the pictures are noise until the
embedded demo model is trained (issue 5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def build(checkpoint: str | None, device: str):
    import torch

    from model import load_pretrained
    from model.config import preset
    from model.text_tokenizer import BPETokenizer, builtin_corpus
    from model.transformer import Transformer
    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq

    if checkpoint:
        model = load_pretrained(checkpoint, device=device)
        vq_dir = os.path.join(checkpoint, "vision_tokenizer")
        vq = load_ibq(vq_dir, device=device) if os.path.isdir(vq_dir) else None
        return model, vq
    torch.manual_seed(0)
    cfg = preset("debug")
    tokenizer = BPETokenizer.train(builtin_corpus(), cfg.num_text_tokens, cfg.codebook_size)
    model = Transformer(cfg).to(device).eval()
    model.vocab, model.tokenizer = tokenizer.vocab, tokenizer
    return model, IBQ(ibq_preset("debug")).to(device).eval()


def prompt_ids(tokenizer, task: str, question: str) -> tuple[list[int], list[int]]:
    """SPEC §2's template (text-only prompt) and its unconditional twin."""
    v = tokenizer.vocab
    cond = f"You are a helpful assistant for {task} task. USER: {question} ASSISTANT: "
    uncond = "You are a helpful assistant. USER:  ASSISTANT: "
    return ([v.bos, *tokenizer.encode(cond, allow_special=False), v.answer_start],
            [v.bos, *tokenizer.encode(uncond, allow_special=False), v.answer_start])


def parse_size(text: str) -> tuple[int, int] | None:
    """'HxW' in tokens -> (h, w); 'auto' -> None (the model samples the size)."""
    if text == "auto":
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--image-size: expected HxW in tokens (e.g. 8x8) or 'auto', got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.environ.get("WORLDSIM_CHECKPOINT"),
                        help="checkpoint folder (official or ours); default: debug preset, random weights")
    parser.add_argument("--device", default=os.environ.get("WORLDSIM_DEVICE", "cpu"))
    parser.add_argument("--task", default="t2i", help="t2i x2i howto story explore vla")
    parser.add_argument("--prompt", default="a red cube on a blue table")
    parser.add_argument("--image-size", default="8x8", help="HxW in tokens, or 'auto' to let the model choose")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("WORLDSIM_DATA", "data"), help="folder for images")
    args = parser.parse_args(argv)

    import torch

    from model.sampling import task_defaults
    from model.generate import generate, ImageDone, ImageStarted, TextDelta, Finished
    from model.vision_tokenizer import to_pil

    try:
        params = task_defaults(args.task).replace(max_new_tokens=args.max_new_tokens)
        size = parse_size(args.image_size)
    except ValueError as e:
        parser.error(str(e))
    model, vq = build(args.checkpoint, args.device)
    if model.tokenizer is None:
        parser.error("--checkpoint: the folder has no tokenizer files")
    cond, uncond = prompt_ids(model.tokenizer, args.task, args.prompt)
    decode = (lambda codes: to_pil(vq.decode(codes[None].to(args.device))[0])) if vq is not None else None
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    print(f"[worldsim] {args.task}: {args.prompt!r} (checkpoint: {args.checkpoint or 'debug preset, random weights'})")
    n_images = 0
    for event in generate(model, cond, uncond_ids=uncond, params=params, image_size=size,
                          generator=torch.Generator().manual_seed(args.seed), tokenizer=model.tokenizer,
                          decode_image=decode, start_with_image=args.task in ("t2i", "x2i")):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageStarted):
            print(f"\n[image {event.height}x{event.width} tokens ...", end="", flush=True)
        elif isinstance(event, ImageDone):
            n_images += 1
            path = os.path.join(args.out, f"image_{n_images}.png")
            if event.image is not None:
                event.image.save(path)
                print(f" saved {path}]")
            else:
                print(" done; no vision tokenizer to decode it]")
        elif isinstance(event, Finished):
            secs = time.perf_counter() - start
            print(f"\n[worldsim] {len(event.token_ids)} tokens, {n_images} image(s), stop: {event.reason}, "
                  f"{secs:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
