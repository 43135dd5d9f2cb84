"""Real servers and small utilities for the engine tests (tests/test_engine_*.py).

Servers: CI (.ci/run) exports WORLDSIM_TEST_REDIS_URL and WORLDSIM_TEST_DATABASE_URL; without them the
fixtures start their own `redis-server` / PostgreSQL (initdb + pg_ctl as the `postgres` user, since
PostgreSQL refuses to run as root) on free loopback ports, and skip when the binaries are missing.
Tests that kill or flush Redis always use a private `redis-server` they own.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_BIN = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll `pred` until it returns a truthy value; AssertionError naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---- Redis -------------------------------------------------------------------------------------------
class RedisServer:
    """A private redis-server on a free loopback port, no persistence. `kill()` sends SIGKILL."""

    def __init__(self):
        if REDIS_BIN is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="ws-redis-")
        self.port = free_port()
        self.start()

    def start(self) -> None:
        """Start (or restart, empty, on the same port) the server and wait until it answers."""
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            wait_for(lambda: _ping(client), 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _ping(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# ---- PostgreSQL --------------------------------------------------------------------------------------
def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()])
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    """A throwaway PostgreSQL cluster (trust auth, fsync off) on a free loopback port, run as `postgres`."""

    def __init__(self):
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="ws-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "pg")
        os.mkdir(self.data)
        self.port = free_port()
        as_root = os.geteuid() == 0
        if as_root:
            shutil.chown(self.data, "postgres")
        self._sh(f"{bindir}/initdb -D {self.data} -A trust -U postgres >/dev/null", as_root)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c full_page_writes=off"
        self._sh(f"{bindir}/pg_ctl -D {self.data} -w -t 60 -l {self.data}/server.log -o '{opts}' start >/dev/null",
                 as_root)
        self.as_root = as_root
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _sh(cmd: str, as_root: bool) -> None:
        argv = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if as_root else ["/bin/sh", "-c", cmd]
        subprocess.run(argv, check=True, timeout=120)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._sh(f"{self.bindir}/pg_ctl -D {self.data} -m immediate -w stop >/dev/null", self.as_root)
        shutil.rmtree(self.root, ignore_errors=True)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name`."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_url: str) -> str:
    """A fresh, empty database on the server of `admin_url`; returns its URL."""
    import psycopg

    name = "ws_test_" + uuid.uuid4().hex[:16]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    name = url.rpartition("/")[2]
    with contextlib.suppress(Exception), psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- images ------------------------------------------------------------------------------------------
def png_image(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A valid PNG claiming w x h 1-bit grey pixels, all zero: a few hundred bytes on disk (the pixels
    compress to almost nothing), hundreds of MB once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- state snapshots ---------------------------------------------------------------------------------
def snapshot(store) -> dict:
    """Every row of every table, for "no state damaged" checks."""
    import sqlalchemy as sa

    from worldsim import store as st

    out = {}
    with store.engine.connect() as conn:
        for table in (st.sessions, st.turns, st.images, st.jobs):
            key = "hash" if table is st.images else "id"
            rows = conn.execute(sa.select(table)).mappings().all()
            out[table.name] = {r[key]: {k: (len(v) if k == "png" else v) for k, v in r.items()} for r in rows}
    return out


def python_env(**extra) -> dict:
    """Environment for a child Python that imports this repository, one torch thread (tiny models run
    far faster that way on a shared 2-core machine), no inherited server settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "WORLDSIM_DATA_DIR")}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args: list[str], timeout: float = 120, **env) -> tuple[int, dict | list | None, str]:
    """`python -m worldsim ARGS` -> (exit code, parsed JSON of the last stdout line or None, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "worldsim", *args], cwd=REPO, env=python_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        parsed = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        parsed = None
    return proc.returncode, parsed, proc.stderr
