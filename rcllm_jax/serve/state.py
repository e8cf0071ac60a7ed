"""The serving state: every user's item history and the append-only event log, in a real database:
SQLite (the standard library's `sqlite3`, WAL journal, `synchronous=FULL`) for one server, or
PostgreSQL (`postgresql://...`, psycopg) shared by several server replicas behind a load balancer.

The database is the truth; the engine's user store only caches the KV of what it holds (a prefix
is keyed by its tokens, and the saved KV carries the history version it was computed from). An
event is one transaction: its log row and the user's new history commit together, or neither
does; the server answers 200 only after the commit, so a kill -9 right after an answer loses
nothing. A client `event_id` makes an event idempotent per user: a retry with the same id is not
applied again and gets the first answer back (marked as a replay); the same id with other items
is refused (`EventConflict`). Events of one user are serialised across processes (SQLite: the
database write lock; PostgreSQL: a transaction-scoped advisory lock on the user id).

User ids are opaque strings ("007" and "7" are two users); item ids are stored as the catalog
names them (MovieLens: integers; a catalog directory's: strings). Histories are capped at `max_history`
items (the most recent are kept: a prompt reads only the latest few; the log keeps every event).

Tables:
  users(user_id TEXT PRIMARY KEY, history TEXT (JSON list of item ids), version INTEGER)
  events(seq (auto) PRIMARY KEY, user_id, event_id (NULL: none), items (JSON), version (the
         history version this event produced), history_length, created (unix seconds)),
         UNIQUE(user_id, event_id)
  seeded(name TEXT PRIMARY KEY): the datasets whose histories were loaded as initial state
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

SCHEMA = ("CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, history TEXT NOT NULL, "
          "version INTEGER NOT NULL)",
          "CREATE TABLE IF NOT EXISTS events (seq {serial} PRIMARY KEY, user_id TEXT NOT NULL, event_id TEXT, "
          "items TEXT NOT NULL, version INTEGER NOT NULL, history_length INTEGER NOT NULL, "
          "created DOUBLE PRECISION NOT NULL, UNIQUE (user_id, event_id))",
          "CREATE TABLE IF NOT EXISTS seeded (name TEXT PRIMARY KEY)")
UPSERT_USER = ("INSERT INTO users (user_id, history, version) VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
               "history = excluded.history, version = excluded.version")
LOG_EVENT = "INSERT INTO events (user_id, event_id, items, version, history_length, created) VALUES (?, ?, ?, ?, ?, ?)"


def is_postgres(target) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


class EventConflict(ValueError):
    """An event_id reused for other items."""


@dataclasses.dataclass(frozen=True)
class Applied:
    """What an event did: the user's history now, the version and history length the event
    produced, and whether this answer is a replay of an event applied before (same event_id)."""
    history: tuple[int, ...]
    version: int
    history_length: int
    replay: bool


class StateStore:
    """User histories and the event log in one database: a SQLite file path or a PostgreSQL URL
    (safe to share between threads: a connection per thread; between processes: the database's
    own locking)."""

    def __init__(self, target, max_history: int = 1000):
        if max_history < 1:
            raise ValueError("max_history must be >= 1")
        self.postgres = is_postgres(target)
        self.target = str(target)
        if not self.postgres:
            self.path = Path(target)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_history = max_history
        self._local = threading.local()
        self._conns: list = []
        self._lock = threading.Lock()
        with self._tx("schema") as db:
            for stmt in SCHEMA:
                db.execute(stmt.format(serial="BIGSERIAL" if self.postgres else "INTEGER"))

    def __str__(self):
        return self.target.split("@")[-1] if self.postgres else str(self.path)

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            if self.postgres:
                import psycopg
                db = _Postgres(psycopg.connect(self.target, autocommit=True))
            else:
                import sqlite3
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
            with self._lock:
                self._conns.append(db)
        return db

    class _Tx:
        def __init__(self, store, key):
            self.store, self.key = store, key

        def __enter__(self):
            db = self.store._db()
            if self.store.postgres:  # one writer per key (a user id) at a time, across processes
                db.execute("BEGIN")
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (self.key,))
            else:  # SQLite: the database's write lock, taken now
                db.execute("BEGIN IMMEDIATE")
            self.db = db
            return db

        def __exit__(self, kind, value, tb):
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
            return False

    def _tx(self, key: str):
        """One write transaction, serialised with every other one on `key` (COMMIT at the end;
        ROLLBACK on an exception)."""
        return self._Tx(self, key)

    def close(self):
        with self._lock:
            for db in self._conns:
                db.close()
            self._conns.clear()
        self._local = threading.local()

    # --- reads ---------------------------------------------------------------------------------

    def user(self, user_id: str) -> tuple[list[int], int] | None:
        """(history, version) of a user, or None for one the database does not know."""
        row = self._db().execute("SELECT history, version FROM users WHERE user_id = ?", (str(user_id),)).fetchone()
        return None if row is None else (json.loads(row[0]), int(row[1]))

    def history(self, user_id: str) -> list:
        """The user's history ([] for an unknown user)."""
        got = self.user(user_id)
        return [] if got is None else got[0]

    def versions(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT user_id, version FROM users").fetchall())

    def num_users(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def num_events(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    # --- writes (each one transaction) ----------------------------------------------------------

    def seed(self, name: str, histories: dict) -> int:
        """Load a dataset's histories as the initial state, once per database (`name` marks it
        seeded): users the database already knows are left as they are. Returns how many were
        inserted."""
        with self._tx("seed") as db:
            if db.execute("SELECT 1 FROM seeded WHERE name = ?", (name,)).fetchone():
                return 0
            have = {u for (u,) in db.execute("SELECT user_id FROM users").fetchall()}
            rows = [(str(u), json.dumps([_item(i) for i in h][-self.max_history:])) for u, h in histories.items()
                    if str(u) not in have]
            if rows:
                db.executemany("INSERT INTO users (user_id, history, version) VALUES (?, ?, 0)", rows)
            db.execute("INSERT INTO seeded (name) VALUES (?)", (name,))
        return len(rows)

    def append(self, user_id: str, items, event_id: str | None = None, check=None) -> Applied:
        """Apply one event: the items appended to the user's history, logged, in one transaction.
        check(new history): raises to refuse the event (nothing is written). With an event_id
        already applied for this user, nothing is written and the first answer comes back."""
        user_id, items = str(user_id), [_item(i) for i in items]
        with self._tx(user_id) as db:
            if event_id is not None:
                row = db.execute("SELECT items, version, history_length FROM events WHERE user_id = ? AND event_id = ?",
                                 (user_id, event_id)).fetchone()
                if row is not None:
                    if json.loads(row[0]) != items:
                        raise EventConflict(f"event_id {event_id!r} of user {user_id!r} was applied with other items "
                                            f"({json.loads(row[0])[:10]})")
                    at = db.execute("SELECT history, version FROM users WHERE user_id = ?", (user_id,)).fetchone()
                    return Applied(tuple(json.loads(at[0])), int(row[1]), int(row[2]), replay=True)
            row = db.execute("SELECT history, version FROM users WHERE user_id = ?", (user_id,)).fetchone()
            history, version = (json.loads(row[0]), int(row[1])) if row else ([], 0)
            history = (history + items)[-self.max_history:]
            if check is not None:
                check(history)
            version += 1
            db.execute(UPSERT_USER, (user_id, json.dumps(history), version))
            db.execute(LOG_EVENT, (user_id, event_id, json.dumps(items), version, len(history), time.time()))
        return Applied(tuple(history), version, len(history), replay=False)

    def put_history(self, user_id: str, items, check=None) -> Applied:
        """Replace a user's history (logged as an event with no event_id and the whole history)."""
        user_id, items = str(user_id), [_item(i) for i in items][-self.max_history:]
        with self._tx(user_id) as db:
            if check is not None:
                check(items)
            row = db.execute("SELECT version FROM users WHERE user_id = ?", (user_id,)).fetchone()
            version = (int(row[0]) if row else 0) + 1
            db.execute(UPSERT_USER, (user_id, json.dumps(items), version))
            db.execute(LOG_EVENT, (user_id, None, json.dumps({"replace": items}), version, len(items), time.time()))
        return Applied(tuple(items), version, len(items), replay=False)


def _item(i):
    """An item id as stored: a string stays one, an integer (numpy's too) becomes a Python int."""
    return i if isinstance(i, str) else int(i)


class _Postgres:
    """A psycopg connection (autocommit: transactions are explicit BEGIN / COMMIT) speaking the
    sqlite3 subset the store uses: `?` placeholders, execute(...).fetchone() / fetchall()."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows):
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def close(self):
        self.conn.close()
