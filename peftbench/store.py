"""The results store: one SQLite file, one row per run, JSON columns for structured data (never pickles).

Why it survives faults:

* WAL mode and short ``BEGIN IMMEDIATE`` transactions: a process killed at any moment leaves either the old
  or the new row, never half of one, and several ``peftbench run`` processes can share one store.
* A run is *claimed* (``running``, with the claiming process' host, pid and start time) before training and
  *finished* (``done`` / ``failed``) after. Rerunning a sweep skips ``done`` runs, skips runs that a live
  process on this host is running, and redoes everything else: failed runs and runs left ``running`` by a
  dead process (its pid is gone, or now belongs to a newer process, which the start time tells apart).
* ``finish`` only writes a row its own process still owns, so a result is stored once.

* Writes wait for another program's write lock with backoff for up to ``PEFTBENCH_STORE_WAIT`` seconds
  (default 1,800), saying so on the console. A finished result that still cannot be written is kept in a
  sidecar file (``<store>.pending/<run_id>.json``) that the next writer imports: no training is lost.
* Readers (``peftbench table``, ``plot``, ``export``, ``report``) open the file read-only
  (``Store(path, readonly=True)``): they never create tables, switch the journal mode or change a file that
  is not a peftbench store.

The store is meant for one machine: SQLite's WAL does not work over network file systems, and a ``running``
row claimed on another host is taken over (it cannot be checked) when a sweep meets it.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import record
from .atomic import atomic_write
from .errors import ConfigError, PeftbenchError

#: the ``runs`` table is the run record's fields (:mod:`peftbench.record`); this is what else the store holds
EXTRA_SCHEMA = """
CREATE INDEX IF NOT EXISTS runs_label_task ON runs(label, task);
-- every sweep that asked for a run, also one that found it finished by another sweep (`table --sweep`)
CREATE TABLE IF NOT EXISTS sweep_runs (sweep TEXT NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (sweep, run_id));
"""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid apart; ``None``
    where ``/proc`` is unavailable or the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may hold spaces and parentheses, so split after it
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` exists (and, when ``started`` is given and checkable, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if started is None:
        return True
    now = process_start(pid)
    return now is None or now == started


#: the columns a file must have to be read as a peftbench store
REQUIRED_COLUMNS = {"run_id", "sweep", "label", "method", "task", "seed", "status", "spec", "best", "final"}


class StoreWriteError(PeftbenchError):
    """A result could not be written (the store stayed locked, or the disk is full); it was kept aside."""

    exit_code = 1


def _wait_budget() -> float:
    return float(os.environ.get("PEFTBENCH_STORE_WAIT", 1800))


class Store:
    def __init__(self, path: str | os.PathLike, readonly: bool = False, log: Callable[[str], object] = print):
        self.path, self.log = Path(path), log
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.proc_start = process_start(self.pid)
        if readonly:
            self.db = _open_readonly(self.path)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=min(60.0, _wait_budget()), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self._check_foreign()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self.db.executescript(record.create_table() + EXTRA_SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise ConfigError(f"{self.path}: not a peftbench results store ({exc})") from None
        self.import_pending()

    def _check_foreign(self) -> None:
        """Refuse, before changing anything, a SQLite file that holds tables but no peftbench ``runs`` table."""
        tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "runs" not in tables:
            raise sqlite3.DatabaseError(f"it holds other tables ({', '.join(sorted(tables)[:5])}) and no runs table")

    def _add_missing_columns(self) -> None:
        """A store made before a record field existed gets its column (the values of older runs: ``NULL``)."""
        have = {row["name"] for row in self.db.execute("PRAGMA table_info(runs)")}
        for name, kind in record.column_types().items():
            if name not in have:
                try:
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._begin()  # take the write lock now: read-then-write without races
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _begin(self) -> None:
        """``BEGIN IMMEDIATE``, waiting with backoff while another program holds the write lock (each try waits
        up to 60 s inside SQLite), for up to ``PEFTBENCH_STORE_WAIT`` seconds in all."""
        deadline, pause, said = time.monotonic() + _wait_budget(), 1.0, False
        while True:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if _disk_full(exc):
                    raise StoreWriteError(f"{self.path}: the disk holding the results store is full ({exc})") from None
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if not said:
                    self.log(f"peftbench: {self.path} is locked by another program; waiting for it (up to "
                             f"{_wait_budget():.0f} s, PEFTBENCH_STORE_WAIT)")
                    said = True
                if time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 30.0)

    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row["status"] if row else None

    def claim(self, run_id: str, fields: dict[str, Any]) -> str:
        """Mark a run as running by this process. Returns ``"claimed"``, ``"done"`` (skip: finished) or
        ``"busy"`` (skip: another live process on this host is running it)."""
        with self.transaction() as db:
            if fields.get("sweep"):
                db.execute("INSERT OR IGNORE INTO sweep_runs (sweep, run_id) VALUES (?, ?)", (fields["sweep"], run_id))
            row = db.execute("SELECT status, host, pid, proc_start FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None:
                if row["status"] == "done":
                    return "done"
                if row["status"] == "running" and row["host"] == self.host and self._other_live(row):
                    return "busy"
            values = {**_encode(fields), "run_id": run_id, "status": "running", "host": self.host, "pid": self.pid,
                      "proc_start": self.proc_start, "started": time.time(), "finished": None, "error": None,
                      "traceback": None}
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            db.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", tuple(values.values()))
        return "claimed"

    def abandoned(self, run_ids: list[str]) -> list[str]:
        """Those of ``run_ids`` still ``running`` under a process of this host that no longer exists."""
        lost = []
        for run_id in run_ids:
            row = self.db.execute("SELECT status, host, pid, proc_start FROM runs WHERE run_id = ?",
                                  (run_id,)).fetchone()
            if row and row["status"] == "running" and row["host"] == self.host and not self._other_live(row):
                lost.append(run_id)
        return lost

    def _other_live(self, row: sqlite3.Row) -> bool:
        if row["pid"] == self.pid and row["proc_start"] == self.proc_start:
            return False  # this very process (a sweep run twice in one process): take it again
        return process_alive(row["pid"], row["proc_start"])

    def finish(self, run_id: str, status: str, fields: dict[str, Any]) -> bool:
        """Store a claimed run's outcome. Returns ``False`` (and writes nothing) when the row is no longer
        this process' claim, e.g. another host took it over. When the store stays locked (or the disk is
        full), the outcome goes to a sidecar file that the next writer imports, and the error is raised."""
        values = {**_encode(fields), "status": status, "finished": time.time()}
        try:
            return self._update(run_id, values, owned=True)
        except (sqlite3.OperationalError, StoreWriteError) as exc:
            pending = self._save_pending(run_id, values)
            raise StoreWriteError(f"{self.path}: could not record run {run_id} ({exc}); its result is kept in "
                                 f"{pending} and is imported by the next `peftbench run` on this store") from None

    def set_harness(self, run_id: str, results: dict[str, Any]) -> None:
        """Merge lm-evaluation-harness results (``{task: {"metrics": {metric: value}, "samples": n}}``) into a
        finished run's record."""
        with self.transaction() as db:
            row = db.execute("SELECT harness FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            merged = {**json.loads(row[0] or "{}"), **results} if row else results
            db.execute("UPDATE runs SET harness = ? WHERE run_id = ?", (json.dumps(merged), run_id))

    def _update(self, run_id: str, values: dict[str, Any], owned: bool) -> bool:
        assignments = ", ".join(f"{k} = ?" for k in values)
        claim = " AND status = 'running' AND host = ? AND pid = ?" if owned else " AND status != 'done'"
        with self.transaction() as db:
            cursor = db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?{claim}",
                                (*values.values(), run_id, *((self.host, self.pid) if owned else ())))
        return cursor.rowcount == 1

    @property
    def pending_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".pending")

    def _save_pending(self, run_id: str, values: dict[str, Any]) -> Path:
        path = self.pending_dir / f"{run_id}.json"
        with atomic_write(path, "w") as f:
            json.dump(values, f)
        return path

    def import_pending(self) -> int:
        """Write the results that an earlier process kept in sidecar files (the store was locked then)."""
        imported = 0
        for path in sorted(self.pending_dir.glob("*.json")) if self.pending_dir.is_dir() else ():
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                self.log(f"peftbench: ignoring unreadable pending result {path} ({exc})")
                continue
            if self._update(path.stem, values, owned=False):
                imported += 1
                self.log(f"peftbench: imported the result of run {path.stem} kept in {path}")
            path.unlink(missing_ok=True)
        return imported

    def runs(self, status: str | None = "done", **where: Any) -> list[dict[str, Any]]:
        clauses, args = [], []
        if status:
            clauses.append("status = ?")
            args.append(status)
        for key, value in where.items():
            if value:
                values = value if isinstance(value, (list, tuple)) else [value]
                marks = ", ".join("?" for _ in values)
                if key == "sweep" and self._has_table("sweep_runs"):  # also runs another sweep had finished
                    clauses.append(f"(sweep IN ({marks}) OR run_id IN (SELECT run_id FROM sweep_runs "
                                   f"WHERE sweep IN ({marks})))")
                    args.extend(values)
                else:
                    clauses.append(f"{key} IN ({marks})")
                args.extend(values)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY started"
        return [_decode(row) for row in self.db.execute(sql, args)]

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def get(self, run_id: str) -> dict[str, Any] | None:
        # a literal prefix: `%` and `_` in an argument are characters, not LIKE wildcards
        rows = self.db.execute("SELECT * FROM runs WHERE substr(run_id, 1, ?) = ?", (len(run_id), run_id)).fetchall()
        rows = [row for row in rows if row["run_id"] == run_id] or rows
        return _decode(rows[0]) if len(rows) == 1 else None


def _open_readonly(path: Path) -> sqlite3.Connection:
    """Open ``path`` for reading only (SQLite ``mode=ro``), refusing anything that is not a peftbench store
    without changing it. A store in a read-only directory (no ``-shm`` file can be made there) opens as
    ``immutable``: nothing can write it there anyway."""
    if not path.is_file():
        raise ConfigError(f"results store {str(path)!r} does not exist" if not path.exists()
                          else f"results store {str(path)!r} is not a file")
    last: Exception | None = None
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        db = sqlite3.connect(f"{path.resolve().as_uri()}?{flags}", uri=True, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as exc:
            db.close()
            last = exc
            continue
        if not REQUIRED_COLUMNS <= have:
            db.close()
            raise ConfigError(f"{path}: not a peftbench results store (no runs table with peftbench's columns)")
        return db
    raise ConfigError(f"{path}: not a peftbench results store, or not readable ({last})")


def _disk_full(exc: BaseException) -> bool:
    return "disk is full" in str(exc)  # SQLITE_FULL: "database or disk is full"


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    json_columns = record.json_columns()
    return {k: json.dumps(v, default=_json_default) if k in json_columns else v for k, v in fields.items()}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays (of any shape) as plain numbers and lists
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in record.json_columns():
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out
