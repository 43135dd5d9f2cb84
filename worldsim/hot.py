"""Hot state in Redis: the job queue, per-job event streams, cancel flags, session locks and worker
liveness. Everything here can be rebuilt from SQL (`Hot.rebuild` re-queues unfinished jobs; a reader
whose stream is gone falls back to the job's SQL record).

Without a Redis URL, or while Redis is down, the same calls run on in-process structures (`Local`)
and a warning is logged once per outage: the embedded default needs no Redis, and a Redis outage
never stops the engine. Across processes, only SQL is shared then.

Keys (prefix `ws:`): `queue` (list of job ids), `processing:{worker}` (list), `workers` (set),
`worker:{id}` (heartbeat, PX), `events:{job}` (stream), `cancel:{job}`, `lock:{session}`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("worldsim.hot")
EVENT_TTL_S = 24 * 3600
HEARTBEAT_MS = 3000


class Local:
    """In-process stand-ins for the Redis structures (one process, many threads)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.queue: collections.deque[str] = collections.deque()
        self.events: dict[str, list[dict]] = {}
        self.cancelled: set[str] = set()
        self.locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    def enqueue(self, job_id: str) -> None:
        with self.cond:
            self.queue.append(job_id)
            self.cond.notify_all()

    def dequeue(self, timeout: float) -> str | None:
        with self.cond:
            if not self.queue:
                self.cond.wait(timeout)
            return self.queue.popleft() if self.queue else None

    def publish(self, job_id: str, event: dict) -> None:
        with self.cond:
            self.events.setdefault(job_id, []).append(event)
            self.cond.notify_all()

    def read(self, job_id: str, after: int, timeout: float) -> list[tuple[str, dict]]:
        with self.cond:
            if len(self.events.get(job_id, [])) <= after:
                self.cond.wait(timeout)
            evs = self.events.get(job_id, [])
            return [(str(i + 1), e) for i, e in enumerate(evs[after:], start=after)]


class Hot:
    def __init__(self, url: str | None = None, prefix: str = "ws:"):
        self.url, self.p = url, prefix
        self.local = Local()
        self.redis = None
        self._down_since: float | None = None
        if url:
            import redis

            self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                              health_check_interval=10)

    # ---- resilience ----------------------------------------------------------------------------
    def _call(self, op: str, fn, fallback):
        """Run a Redis operation; on a connection failure log once and use the in-process fallback."""
        if self.redis is None:
            return fallback()
        import redis

        try:
            result = fn(self.redis)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("Redis at %s is unreachable (%s during %s); carrying on from SQL and in-process state",
                            self.url, type(e).__name__, op)
            return fallback()
        if self._down_since is not None:
            log.warning("Redis at %s is back after %.1f s", self.url, time.time() - self._down_since)
            self._down_since = None
        return result

    @property
    def available(self) -> bool:
        return self._call("ping", lambda r: bool(r.ping()), lambda: False)

    # ---- queue ---------------------------------------------------------------------------------
    def enqueue(self, job_id: str) -> None:
        self._call("enqueue", lambda r: r.lpush(self.p + "queue", job_id), lambda: self.local.enqueue(job_id))

    def dequeue(self, worker: str, timeout: float = 0.5) -> str | None:
        """Next job id for `worker` (moved to its processing list in Redis, so a dead worker's job is
        found again by `reap`), or None after `timeout`."""
        local = self.local.dequeue(0)
        if local is not None:
            return local

        def from_redis(r):
            got = r.blmove(self.p + "queue", self.p + f"processing:{worker}", timeout, "RIGHT", "LEFT")
            return got.decode() if got else None

        return self._call("dequeue", from_redis, lambda: self.local.dequeue(timeout))

    def ack(self, worker: str, job_id: str) -> None:
        self._call("ack", lambda r: r.lrem(self.p + f"processing:{worker}", 0, job_id), lambda: None)

    def heartbeat(self, worker: str) -> None:
        def beat(r):
            pipe = r.pipeline()
            pipe.sadd(self.p + "workers", worker)
            pipe.set(self.p + f"worker:{worker}", "1", px=HEARTBEAT_MS)
            pipe.execute()

        self._call("heartbeat", beat, lambda: None)

    def reap(self) -> list[str]:
        """Put the jobs of workers whose heartbeat expired back on the queue. Returns their ids."""
        def reap_redis(r):
            moved = []
            for w in r.smembers(self.p + "workers"):
                w = w.decode()
                if r.exists(self.p + f"worker:{w}"):
                    continue
                while (job := r.lmove(self.p + f"processing:{w}", self.p + "queue", "RIGHT", "RIGHT")) is not None:
                    moved.append(job.decode())
                r.srem(self.p + "workers", w)
            return moved

        return self._call("reap", reap_redis, lambda: [])

    def rebuild(self, unfinished_job_ids: list[str]) -> int:
        """After Redis lost its data (flush, restart without persistence): queue the unfinished jobs of
        SQL that no worker holds. Returns how many were queued."""
        def redo(r):
            held = set(x.decode() for x in r.lrange(self.p + "queue", 0, -1))
            for w in r.smembers(self.p + "workers"):
                held |= set(x.decode() for x in r.lrange(self.p + f"processing:{w.decode()}", 0, -1))
            missing = [j for j in unfinished_job_ids if j not in held]
            for j in missing:
                r.lpush(self.p + "queue", j)
            return len(missing)

        def redo_local():  # one process owns everything: what SQL says is unfinished was interrupted
            for j in unfinished_job_ids:
                self.local.enqueue(j)
            return len(unfinished_job_ids)

        return self._call("rebuild", redo, redo_local)

    # ---- events --------------------------------------------------------------------------------
    def publish(self, job_id: str, event: dict) -> None:
        import json

        def add(r):
            key = self.p + f"events:{job_id}"
            r.xadd(key, {"e": json.dumps(event)}, maxlen=20000, approximate=True)
            r.expire(key, EVENT_TTL_S)

        self._call("publish", add, lambda: self.local.publish(job_id, event))

    def read(self, job_id: str, after: str = "0", timeout: float = 1.0) -> list[tuple[str, dict]] | None:
        """Events after the id `after` (stream ids from Redis, counters in process). None when Redis
        has no such stream (expired or flushed): the caller falls back to SQL."""
        import json

        def xread(r):
            key = self.p + f"events:{job_id}"
            got = r.xread({key: after}, block=int(timeout * 1000), count=500)
            if not got:
                return [] if r.exists(key) or after == "0" else None
            return [(i.decode(), json.loads(f[b"e"])) for i, f in got[0][1]]

        local = lambda: self.local.read(job_id, int(after) if after.isdigit() else 0, timeout)  # noqa: E731
        if job_id in self.local.events:
            return local()
        return self._call("read", xread, local)

    # ---- cancel and locks ----------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        self.local.cancelled.add(job_id)
        self._call("cancel", lambda r: r.set(self.p + f"cancel:{job_id}", "1", ex=EVENT_TTL_S), lambda: None)

    def is_cancelled(self, job_id: str) -> bool:
        if job_id in self.local.cancelled:
            return True
        return bool(self._call("is_cancelled", lambda r: r.exists(self.p + f"cancel:{job_id}"), lambda: False))

    def lock(self, session_id: str, timeout_s: float = 30.0):
        """A per-session lock: redis-py's Lock (SET NX PX + compare-and-delete) with an expiry, so a dead
        worker's lock lapses; in process, a threading lock. Use as a context manager; call
        `.reacquire()` now and then during long work to keep a Redis lock alive."""
        return SessionLock(self, session_id, timeout_s)


class SessionLock:
    def __init__(self, hot: Hot, session_id: str, timeout_s: float):
        self.hot, self.session_id, self.timeout_s = hot, session_id, timeout_s
        self.redis_lock = None
        self.local = hot.local.locks[session_id]

    def __enter__(self):
        self.local.acquire()  # threads of this process first
        def take(r):
            lock = r.lock(self.hot.p + f"lock:{self.session_id}", timeout=self.timeout_s, blocking_timeout=None)
            lock.acquire()
            return lock

        self.redis_lock = self.hot._call("lock", take, lambda: None)
        self._last = time.time()
        return self

    def reacquire(self) -> None:
        if self.redis_lock is not None and time.time() - self._last > self.timeout_s / 3:
            self._last = time.time()
            self.hot._call("lock", lambda r: self.redis_lock.reacquire(), lambda: None)

    def __exit__(self, *exc):
        if self.redis_lock is not None:
            import redis

            try:
                self.redis_lock.release()
            except (redis.exceptions.LockError, redis.ConnectionError, redis.TimeoutError):
                pass  # expired or Redis gone: SQL's (session_id, seq) uniqueness still guards commits
        self.local.release()
        return False
