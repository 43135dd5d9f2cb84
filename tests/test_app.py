"""`python app.py` as a user runs it: one streaming turn on the debug preset writes a decoded image."""

import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_app(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_app_t2i_writes_image_of_requested_size(tmp_path):
    out = tmp_path / "out"
    proc = run_app("--image-size", "4x6", "--max-new-tokens", "60", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[image 4x6 tokens" in proc.stdout
    image = Image.open(out / "image_1.png")
    # debug IBQ downsamples by 16: 4x6 tokens -> 64x96 px (height x width)
    assert image.size == (96, 64)


def test_app_rejects_unknown_task_and_bad_size(tmp_path):
    proc = run_app("--task", "dance", cwd=tmp_path)
    assert proc.returncode != 0 and "task" in proc.stderr and "explore" in proc.stderr
    for bad in ("4x5x6", "fourxfive", "0x4"):
        proc = run_app("--image-size", bad, cwd=tmp_path)
        assert proc.returncode != 0 and "--image-size" in proc.stderr
