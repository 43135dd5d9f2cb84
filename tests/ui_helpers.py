"""The app as a user runs it, for the UI tests: `python app.py` in a subprocess on a free port with a
temporary data directory, tiny images (4x4 tokens) unless told otherwise, and one torch thread (tiny models decode faster
on one thread of a busy machine). It can be killed and started again on the same port and data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, data_dir: str, *extra: str, port: int | None = None, image_size: str | None = "4x4"):
        """image_size: the app's --image-size (None: the model's default, the demo's training size)."""
        self.data_dir, self.extra = str(data_dir), extra
        self.image_size = image_size
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "server.log")

    def start(self, timeout: float = 120.0) -> "AppServer":
        os.makedirs(self.data_dir, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": os.path.join(self.data_dir, "gradio-tmp"), "PYTHONUNBUFFERED": "1"}
        env.pop("REDIS_URL", None)
        env.pop("DATABASE_URL", None)
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "app.py"), "--port", str(self.port), "--data-dir", self.data_dir,
             *(["--image-size", self.image_size] if self.image_size else []), *self.extra], cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the app did not answer within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """Stop it hard (SIGKILL), as a crash or a machine restart would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""
