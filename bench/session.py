"""Step latency of a session at turn 1 and turn N, with the prefix cache reused across turns and with
the history recomputed every step, side by side in one run.

    python bench/session.py [--preset debug|demo] [--turns 20] [--image-size 8] [--json]

Both runs use the same random-weight model, the same seed and the same instructions (an explore
session on SQLite in a temp dir, one in-process worker). "recompute" forgets the session's KV cache
before every step, so each step prefills the whole history again; the checks at the end confirm both
runs produced the same turns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worldsim.engine import Engine  # noqa: E402
from worldsim.hot import Hot  # noqa: E402
from worldsim.runtime import Runtime  # noqa: E402
from worldsim.store import Store, default_database_url  # noqa: E402

INSTRUCTIONS = ["The camera pushes forward.", "The camera pans left.", "The camera pans right.",
                "The camera pulls back."]


def run_session(runtime: Runtime, turns: int, size: int, recompute: bool) -> tuple[list[float], list[dict]]:
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(Store(default_database_url(d)), Hot(None), runtime, workers=1)
        try:
            latencies, records = [], []
            t = time.perf_counter()
            first = engine.new("bench", "explore", prompt="A stone corridor lit by torches.",
                               settings={"image_size": [size, size], "seed": 1})
            latencies.append(time.perf_counter() - t)
            records.append(first)
            sid = first["session_id"]
            for i in range(1, turns):
                if recompute:
                    runtime.forget(sid)
                t = time.perf_counter()
                records.append(engine.step("bench", sid, INSTRUCTIONS[i % len(INSTRUCTIONS)]))
                latencies.append(time.perf_counter() - t)
            return latencies, records
        finally:
            engine.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--image-size", type=int, default=8, help="image side in tokens")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        runtime = Runtime.debug(preset_name=args.preset)
    except ValueError as e:
        p.error(str(e))
    run_session(runtime, 2, args.image_size, False)  # warm-up
    reuse, reuse_turns = run_session(runtime, args.turns, args.image_size, recompute=False)
    recompute, recompute_turns = run_session(runtime, args.turns, args.image_size, recompute=True)
    same = [a["output"] == b["output"] for a, b in zip(reuse_turns, recompute_turns)]
    rows = []
    for turn in (1, args.turns):
        i = turn - 1
        rows.append({"turn": turn, "prompt_tokens": reuse_turns[i]["meta"]["prompt_tokens"],
                     "reused_tokens": reuse_turns[i]["meta"]["cached_tokens_reused"],
                     "reuse_s": reuse[i], "recompute_s": recompute[i], "speedup": recompute[i] / reuse[i]})
    if args.json:
        print(json.dumps({"preset": args.preset, "image_size": args.image_size, "rows": rows,
                          "same_turns": all(same)}, indent=2))
        return
    print(f"preset {args.preset} (random weights), explore session, {args.image_size}x{args.image_size}-token images, "
          "CPU, one worker")
    print(f"{'turn':>5}{'prompt tok':>12}{'reused tok':>12}{'reuse s':>10}{'recompute s':>13}{'ratio':>8}")
    for r in rows:
        print(f"{r['turn']:>5}{r['prompt_tokens']:>12}{r['reused_tokens']:>12}{r['reuse_s']:>10.3f}"
              f"{r['recompute_s']:>13.3f}{r['speedup']:>7.2f}x")
    print(f"same turns in both runs: {sum(same)}/{len(same)}")


if __name__ == "__main__":
    main()
