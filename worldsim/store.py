"""The system of record: sessions, turns, images and jobs in SQL (SQLAlchemy 2 Core).

SQLite (WAL, busy timeout) in a data directory by default; PostgreSQL through a `postgresql://` URL.
The schema is created and upgraded by Alembic (worldsim/migrations) when a Store opens.

Invariants:
- a turn is one row, written in one transaction: a step is either fully committed or absent;
- (session_id, seq) is unique, and a commit carries its job id, so a retried job finds its own turn
  instead of committing twice (`commit_turn` is idempotent per job);
- images are stored once, by the SHA-256 of their PNG bytes;
- every call that reads or changes a session names the acting user; another user's session is
  "not found" (`NotFound`), exactly like a missing one.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import sqlalchemy as sa

metadata = sa.MetaData()

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False, index=True),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("title", sa.Text, nullable=False, default=""),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("parent_id", sa.String(32), nullable=True),
    sa.Column("parent_seq", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
turns = sa.Table(
    "turns", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("output", sa.JSON, nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("job_id", sa.String(32), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("session_id", "seq", name="uq_turns_session_seq"),
)
images = sa.Table(
    "images", metadata,
    sa.Column("hash", sa.String(64), primary_key=True),
    sa.Column("png", sa.LargeBinary, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("codes", sa.JSON, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("session_id", sa.String(32), nullable=False, index=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("seq", sa.Integer, nullable=True),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class NotFound(LookupError):
    """A session, turn, image or job that does not exist for this user."""


class Conflict(RuntimeError):
    """Another writer committed first (e.g. the same (session_id, seq) by a different job)."""


def new_id() -> str:
    return uuid.uuid4().hex


def default_database_url(data_dir: str) -> str:
    os.makedirs(data_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(data_dir, "worldsim.db"))


def _sqlite_engine(url: str) -> sa.Engine:
    """SQLite with WAL, a busy timeout and pysqlite's transaction handling fixed, so BEGIN is ours."""
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself (documented pysqlite fix)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

    return engine


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith("postgresql+"):
        raise ValueError(f"database_url: unsupported {url.split(':')[0]!r}; allowed: sqlite:///PATH, postgresql://...")
    return sa.create_engine(url, pool_pre_ping=True)


def migrate(engine: sa.Engine) -> None:
    """Upgrade the schema to the newest Alembic revision (concurrent callers are serialised)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.path.join(os.path.dirname(__file__), "migrations"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7316001)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)
        self._local = threading.local()

    def close(self) -> None:
        self.engine.dispose()

    # ---- sessions ----------------------------------------------------------------------------
    def create_session(self, owner: str, mode: str, settings: dict, title: str = "",
                       parent: tuple[str, int] | None = None, session_id: str | None = None) -> dict:
        now = time.time()
        row = {"id": session_id or new_id(), "owner": owner, "mode": mode, "title": title, "settings": settings,
               "parent_id": parent[0] if parent else None, "parent_seq": parent[1] if parent else None,
               "created_at": now, "updated_at": now}
        with self.engine.begin() as conn:
            conn.execute(sessions.insert().values(**row))
        return self._session_dict(row, 0)

    def get_session(self, owner: str, session_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sessions.select().where(sessions.c.id == session_id,
                                                       sessions.c.owner == owner)).mappings().first()
            if row is None:
                raise NotFound(f"session_id: no session {session_id!r} for user {owner!r}")
            n = conn.execute(sa.select(sa.func.count()).select_from(turns)
                             .where(turns.c.session_id == session_id)).scalar_one()
        return self._session_dict(row, n)

    def list_sessions(self, owner: str) -> list[dict]:
        with self.engine.connect() as conn:
            counts = (sa.select(turns.c.session_id, sa.func.count().label("n"))
                      .group_by(turns.c.session_id).subquery())
            rows = conn.execute(sa.select(sessions, counts.c.n).outerjoin(counts, counts.c.session_id == sessions.c.id)
                                .where(sessions.c.owner == owner)
                                .order_by(sessions.c.updated_at.desc())).mappings().all()
        return [self._session_dict(r, r["n"] or 0) for r in rows]

    def update_session(self, owner: str, session_id: str, **fields) -> dict:
        allowed = {"title", "settings"}
        if set(fields) - allowed:
            raise ValueError(f"fields: can only update {sorted(allowed)}, got {sorted(fields)}")
        self.get_session(owner, session_id)
        with self.engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.id == session_id)
                         .values(**fields, updated_at=time.time()))
        return self.get_session(owner, session_id)

    def delete_session(self, owner: str, session_id: str) -> None:
        self.get_session(owner, session_id)
        with self.engine.begin() as conn:
            conn.execute(turns.delete().where(turns.c.session_id == session_id))
            conn.execute(sessions.delete().where(sessions.c.id == session_id))

    @staticmethod
    def _session_dict(row, num_turns: int) -> dict:
        parent = {"session_id": row["parent_id"], "seq": row["parent_seq"]} if row["parent_id"] else None
        return {"session_id": row["id"], "owner": row["owner"], "mode": row["mode"], "title": row["title"],
                "settings": row["settings"], "parent": parent, "created_at": row["created_at"],
                "updated_at": row["updated_at"], "num_turns": num_turns}

    # ---- turns -------------------------------------------------------------------------------
    def turns(self, session_id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(turns.select().where(turns.c.session_id == session_id)
                                .order_by(turns.c.seq)).mappings().all()
        return [self._turn_dict(r) for r in rows]

    def turn_for_job(self, job_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(turns.select().where(turns.c.job_id == job_id)).mappings().first()
        return self._turn_dict(row) if row else None

    def commit_turn(self, session_id: str, seq: int, kind: str, input: dict, output: list, meta: dict,
                    job_id: str | None = None, replace: bool = False) -> dict:
        """Write one turn atomically. Idempotent per job: if this job already committed it, return that
        turn. `replace` overwrites an existing turn at `seq` (re-roll of the last turn) in the same
        transaction. Another writer's turn at `seq` raises Conflict."""
        row = {"session_id": session_id, "seq": seq, "kind": kind, "input": input, "output": output,
               "meta": meta, "job_id": job_id, "created_at": time.time()}
        with self.engine.begin() as conn:
            existing = conn.execute(turns.select().where(turns.c.session_id == session_id, turns.c.seq == seq)
                                    ).mappings().first()
            if existing is not None and job_id is not None and existing["job_id"] == job_id:
                return self._turn_dict(existing)
            if existing is not None and not replace:
                raise Conflict(f"seq: turn {seq} of session {session_id} was committed by another step")
            if existing is not None:
                conn.execute(turns.delete().where(turns.c.id == existing["id"]))
            last = conn.execute(sa.select(sa.func.max(turns.c.seq)).where(turns.c.session_id == session_id)
                                ).scalar_one()
            if seq != (0 if last is None else last + 1):
                raise Conflict(f"seq: expected {0 if last is None else last + 1} for session {session_id}, got {seq}")
            try:
                conn.execute(turns.insert().values(**row))
            except sa.exc.IntegrityError:
                raise Conflict(f"seq: turn {seq} of session {session_id} was committed by another step") from None
            conn.execute(sessions.update().where(sessions.c.id == session_id).values(updated_at=time.time()))
        return self._turn_dict(row)

    def delete_turns_from(self, session_id: str, seq: int) -> int:
        """Delete turns with seq >= `seq` (undo). Returns how many."""
        with self.engine.begin() as conn:
            n = conn.execute(turns.delete().where(turns.c.session_id == session_id, turns.c.seq >= seq)).rowcount
            conn.execute(sessions.update().where(sessions.c.id == session_id).values(updated_at=time.time()))
        return n

    def copy_turns(self, src: str, dst: str, upto_seq: int) -> None:
        """Copy turns 0..upto_seq of `src` into `dst` (a branch shares its parent's prefix)."""
        with self.engine.begin() as conn:
            rows = conn.execute(turns.select().where(turns.c.session_id == src, turns.c.seq <= upto_seq)
                                .order_by(turns.c.seq)).mappings().all()
            for r in rows:
                conn.execute(turns.insert().values(
                    session_id=dst, seq=r["seq"], kind=r["kind"], input=r["input"], output=r["output"],
                    meta={**r["meta"], "copied_from": {"session_id": src, "seq": r["seq"]}}, job_id=None,
                    created_at=r["created_at"]))

    @staticmethod
    def _turn_dict(row) -> dict:
        return {"session_id": row["session_id"], "seq": row["seq"], "kind": row["kind"], "input": row["input"],
                "output": row["output"], "meta": row["meta"], "job_id": row["job_id"],
                "created_at": row["created_at"]}

    # ---- images ------------------------------------------------------------------------------
    def put_image(self, png: bytes, width: int, height: int, codes: list | None = None) -> str:
        from worldsim.media import content_hash

        digest = content_hash(png)
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(images.c.hash).where(images.c.hash == digest)).first()
            if exists is None:
                try:
                    with conn.begin_nested():
                        conn.execute(images.insert().values(hash=digest, png=png, width=width, height=height,
                                                            codes=codes, created_at=time.time()))
                except sa.exc.IntegrityError:
                    pass  # stored concurrently by another writer: same bytes, same hash
        return digest

    def set_image_codes(self, digest: str, size_key: str, codes: list) -> None:
        """Record an uploaded image's code grid at one size ({"HxW": grid} in `codes`)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(images.c.codes).where(images.c.hash == digest)).first()
            if row is None:
                raise NotFound(f"image: no image {digest!r}")
            current = row[0] if isinstance(row[0], dict) else {}
            conn.execute(images.update().where(images.c.hash == digest).values(codes={**current, size_key: codes}))

    def get_image(self, digest: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(images.select().where(images.c.hash == digest)).mappings().first()
        if row is None:
            raise NotFound(f"image: no image {digest!r}")
        return dict(row)

    def image_owned_by(self, owner: str, digest: str) -> bool:
        """True when one of `owner`'s sessions uses the image (media URLs are owner-checked). The hash
        is 64 hex digits, so a text match on the turn's JSON cannot hit anything but that image."""
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            return False
        used = sa.or_(sa.cast(turns.c.input, sa.Text).contains(digest),
                      sa.cast(turns.c.output, sa.Text).contains(digest))
        q = (sa.select(turns.c.id).join(sessions, sessions.c.id == turns.c.session_id)
             .where(sessions.c.owner == owner, used).limit(1))
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    # ---- jobs --------------------------------------------------------------------------------
    def create_job(self, session_id: str, owner: str, action: str, payload: dict) -> dict:
        now = time.time()
        row = {"id": new_id(), "session_id": session_id, "owner": owner, "action": action, "payload": payload,
               "status": "queued", "seq": None, "result": None, "error": None, "attempts": 0, "worker": None,
               "created_at": now, "updated_at": now}
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(**row))
        return row

    def get_job(self, job_id: str, owner: str | None = None) -> dict:
        with self.engine.connect() as conn:
            q = jobs.select().where(jobs.c.id == job_id)
            if owner is not None:
                q = q.where(jobs.c.owner == owner)
            row = conn.execute(q).mappings().first()
        if row is None:
            raise NotFound(f"job_id: no job {job_id!r}" + (f" for user {owner!r}" if owner else ""))
        return dict(row)

    def update_job(self, job_id: str, **fields) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**fields, updated_at=time.time()))

    def claim_job(self, job_id: str, worker: str) -> dict | None:
        """Mark a queued (or re-queued) job running for `worker`; None if it already finished."""
        with self.engine.begin() as conn:
            row = conn.execute(jobs.select().where(jobs.c.id == job_id)).mappings().first()
            if row is None or row["status"] in ("done", "failed", "cancelled"):
                return None
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                status="running", worker=worker, attempts=row["attempts"] + 1, updated_at=time.time()))
        return {**dict(row), "status": "running", "worker": worker, "attempts": row["attempts"] + 1}

    def unfinished_jobs(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(jobs.select().where(jobs.c.status.in_(("queued", "running")))
                                .order_by(jobs.c.created_at)).mappings().all()
        return [dict(r) for r in rows]
