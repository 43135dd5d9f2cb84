"""Bring your own episodes: a folder of episodes (frames + a JSON of instructions or subtasks) -> dataset
shards in one task format (SPEC §2 tasks; §7 SFT data). This is how a robotics team or a game studio
brings its own logs.

    python -m train.data.from_episodes DIR --out OUT --task {explore,vla,howto,story,t2i,x2i}
        [--vision-tokenizer IBQ_DIR] [--image-area PX] [--raw-images] [--all-starts] [--records-per-shard N]

Episode layout: every sub-folder of DIR holding an `episode.json` is one episode (sorted by name):

    DIR/<episode>/episode.json
    DIR/<episode>/<frame files>          PNG/JPEG/... named in episode.json, paths relative to the episode

    episode.json = {
      "instruction": "stack the red cube on the blue cube",   # the goal, prompt or title (required)
      "initial_frame": "start.png",                            # the observation before step 1 (optional;
                                                               #   required for vla, used by x2i/explore/story)
      "arm": "Franka Panda",                                   # robot arm type (vla only, default "robot arm")
      "steps": [                                               # one or more, in order (required)
        {"text": "pick up the red cube", "frame": "001.png"},  # the step's instruction / subtask / caption
        ...                                                    #   and the frame at its end (its keyframe)
      ]
    }

Records per task (question, prompt images -> answer):
- explore: instruction, [initial_frame] -> for each step: its text, its frame
- story:   instruction, [initial_frame] -> for each step: its text, its frame
- howto:   instruction -> for each step: its text, its frame
- vla:     "Robot Arm Type: {arm}. Instruction: {instruction}. Finish the task with {n} steps.", initial_frame
           -> for each step: "Current Step: {text}", its frame (SPEC §2). With --all-starts, one record per
           starting step k (the frame of step k-1 as the scene, n = the steps left), as the paper trains
           "starting from intermediate steps".
- t2i:     one record per step: text -> frame
- x2i:     one record per step: text, [previous frame (initial_frame before step 1; step 1 is skipped
           without one)] -> frame
Images are tokenized now with an IBQ (`--vision-tokenizer`, default: the debug preset with random weights
and a warning) at about `--image-area` pixels, or kept as absolute paths with `--raw-images` and tokenized
at training time (train/lm.py `vision_tokenizer`). A missing episode.json field or frame file is an error
naming the file; the command then exits with status 2. It ends by printing a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train import common
from train.data import format as fmt
from train.data.vision import DEFAULT_IMAGE_AREA


def read_episode(folder: str) -> dict:
    """episode.json of one folder, validated, with frame paths made absolute and checked to exist."""
    path = os.path.join(folder, "episode.json")
    if not os.path.isfile(path):
        raise ValueError(f"episode: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            ep = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"episode: {path} is not valid JSON ({e})") from None
    if not isinstance(ep, dict):
        raise ValueError(f"episode: {path} must hold a JSON object")
    if not isinstance(ep.get("instruction"), str) or not ep["instruction"].strip():
        raise ValueError(f"episode: {path}: 'instruction' must be a non-empty string")
    steps = ep.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"episode: {path}: 'steps' must be a non-empty list")

    def frame(rel, where):
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"episode: {path}: {where} must be a file name")
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            raise ValueError(f"episode: {path}: {where} names {full}, which does not exist")
        return os.path.abspath(full)

    out = {"instruction": ep["instruction"].strip(), "arm": ep.get("arm", "robot arm"), "steps": [],
           "initial_frame": frame(ep["initial_frame"], "initial_frame") if ep.get("initial_frame") else None}
    for i, st in enumerate(steps):
        if not isinstance(st, dict) or not isinstance(st.get("text"), str):
            raise ValueError(f"episode: {path}: steps[{i}] must be an object with 'text' and 'frame'")
        out["steps"].append({"text": st["text"].strip(), "frame": frame(st.get("frame"), f"steps[{i}].frame")})
    return out


def episode_records(ep: dict, task: str, image, all_starts: bool = False) -> list[dict]:
    """Records of one episode (see the module docstring); image(path) -> an IMAGE dict."""
    steps, init = ep["steps"], ep["initial_frame"]
    first = [image(init)] if init else []
    if task in ("explore", "story"):
        answer = [seg for st in steps for seg in (fmt.text(st["text"]), {"image": image(st["frame"])})]
        return [fmt.record(task, answer, ep["instruction"], first)]
    if task == "howto":
        answer = [seg for st in steps for seg in (fmt.text(st["text"]), {"image": image(st["frame"])})]
        return [fmt.record(task, answer, ep["instruction"])]
    if task == "vla":
        if init is None:
            raise ValueError(f"episode: vla needs 'initial_frame' (the scene) for {ep['instruction']!r}")
        records = []
        for k in range(len(steps) if all_starts else 1):
            scene = image(init) if k == 0 else image(steps[k - 1]["frame"])
            rest = steps[k:]
            q = (f"Robot Arm Type: {ep['arm']}. Instruction: {ep['instruction']}. "
                 f"Finish the task with {len(rest)} steps.")
            answer = [seg for st in rest for seg in (fmt.text(f"Current Step: {st['text']}"),
                                                      {"image": image(st["frame"])})]
            records.append(fmt.record("vla", answer, q, [scene]))
        return records
    if task == "t2i":
        return [fmt.record("t2i", [{"image": image(st["frame"])}], st["text"]) for st in steps]
    if task == "x2i":
        records, prev = [], init
        for st in steps:
            if prev is not None:
                records.append(fmt.record("x2i", [{"image": image(st["frame"])}], st["text"], [image(prev)]))
            prev = st["frame"]
        return records
    raise ValueError(f"task: must be one of {list(fmt.TASKS)}, got {task!r}")


def convert(root: str, out: str, task: str, *, vision_tokenizer: str | None = None,
            image_area: int = DEFAULT_IMAGE_AREA, raw_images: bool = False, all_starts: bool = False,
            records_per_shard: int = 1000) -> dict:
    if task not in fmt.TASKS:
        raise ValueError(f"task: must be one of {list(fmt.TASKS)}, got {task!r}")
    if not os.path.isdir(root):
        raise ValueError(f"episodes: {root} is not a folder")
    folders = sorted(os.path.join(root, n) for n in os.listdir(root)
                     if os.path.isfile(os.path.join(root, n, "episode.json")))
    if not folders:
        raise ValueError(f"episodes: no <episode>/episode.json under {root}")
    episodes = [read_episode(f) for f in folders]  # every file is checked before any work
    if raw_images:
        ibq, codebook = None, None

        def image(path):
            return {"path": path}
    else:
        from train.data.vision import image_codes, load_vision_tokenizer

        ibq = load_vision_tokenizer(vision_tokenizer)
        codebook, cache = ibq.config.codebook_size, {}

        def image(path):
            if path not in cache:
                cache[path] = image_codes(ibq, path, image_area)
            return {"codes": cache[path]}
    records = [r for ep in episodes for r in episode_records(ep, task, image, all_starts)]
    if not records:
        raise ValueError(f"episodes: {root} produced no {task} records (x2i needs two frames per step pair)")
    shards = fmt.write_shards(out, records, codebook_size=codebook, source=f"from_episodes {root} --task {task}",
                              records_per_shard=records_per_shard)
    n_images = sum(len(r["images"]) + sum("image" in s for s in r["answer"]) for r in records)
    return {"episodes": len(episodes), "sequences": len(records), "images": n_images, "shards": len(shards),
            "task": task, "out": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--out", required=True)
    p.add_argument("--task", required=True, choices=fmt.TASKS)
    p.add_argument("--vision-tokenizer")
    p.add_argument("--image-area", type=int, default=DEFAULT_IMAGE_AREA)
    p.add_argument("--raw-images", action="store_true")
    p.add_argument("--all-starts", action="store_true")
    p.add_argument("--records-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    return common.print_summary(lambda: convert(
        a.dir, a.out, a.task, vision_tokenizer=a.vision_tokenizer, image_area=a.image_area,
        raw_images=a.raw_images, all_starts=a.all_starts, records_per_shard=a.records_per_shard))


if __name__ == "__main__":
    sys.exit(main())
