"""The results store: one SQLite file, one row per run, JSON columns for structured data (never pickles).

WAL mode and short ``BEGIN IMMEDIATE`` transactions make it safe for concurrent ``peftbench run``s and for
being killed at any moment: a run is either finished (``done``/``failed``) or it is redone on the next run.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    sweep TEXT, label TEXT, method TEXT, task TEXT, seed INTEGER, model TEXT,
    status TEXT NOT NULL,            -- running | done | failed
    spec TEXT,                       -- JSON: everything that determines the result
    budget TEXT,                     -- JSON: target and solved counts
    trainable TEXT,                  -- JSON: measured counts
    best TEXT, final TEXT, best_step INTEGER, history TEXT, method_report TEXT,
    wall_s REAL, train_s REAL, tokens_per_s REAL, peak_mem_bytes INTEGER, mem_kind TEXT, steps INTEGER, median_step_s REAL,
    error TEXT, traceback TEXT,
    host TEXT, pid INTEGER, started REAL, finished REAL, artifacts TEXT
);
CREATE INDEX IF NOT EXISTS runs_label_task ON runs(label, task);
"""

JSON_COLUMNS = ("spec", "budget", "trainable", "best", "final", "history", "method_report")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row["status"] if row else None

    def claim(self, run_id: str, fields: dict[str, Any]) -> str:
        """Mark a run as running by this process. Returns ``"claimed"``, ``"done"`` (skip: finished) or
        ``"busy"`` (skip: another live process on this host is running it)."""
        host, pid = socket.gethostname(), os.getpid()
        with self.transaction() as db:
            row = db.execute("SELECT status, host, pid FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None:
                if row["status"] == "done":
                    return "done"
                if (row["status"] == "running" and row["host"] == host and row["pid"] != pid
                        and _pid_alive(row["pid"])):
                    return "busy"
            values = {**_encode(fields), "run_id": run_id, "status": "running", "host": host, "pid": pid,
                      "started": time.time(), "finished": None, "error": None, "traceback": None}
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            db.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", tuple(values.values()))
        return "claimed"

    def finish(self, run_id: str, status: str, fields: dict[str, Any]) -> None:
        values = {**_encode(fields), "status": status, "finished": time.time()}
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values.values(), run_id))

    def runs(self, status: str | None = "done", **where: Any) -> list[dict[str, Any]]:
        clauses, args = [], []
        if status:
            clauses.append("status = ?")
            args.append(status)
        for key, value in where.items():
            if value:
                values = value if isinstance(value, (list, tuple)) else [value]
                clauses.append(f"{key} IN ({', '.join('?' for _ in values)})")
                args.extend(values)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY started"
        return [_decode(row) for row in self.db.execute(sql, args)]

    def get(self, run_id: str) -> dict[str, Any] | None:
        rows = self.db.execute("SELECT * FROM runs WHERE run_id = ? OR run_id LIKE ?", (run_id, run_id + "%")).fetchall()
        return _decode(rows[0]) if len(rows) == 1 else None


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v, default=_json_default) if k in JSON_COLUMNS else v for k, v in fields.items()}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in JSON_COLUMNS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out
