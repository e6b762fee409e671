"""The results store: claims, stale and reused pids, owner-only finish, concurrency, migration, JSON only."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys

import pytest

from peftbench.errors import ConfigError
from peftbench.store import Store, process_alive, process_start

FIELDS = {"sweep": "s", "label": "lora", "method": "lora", "task": "toy", "seed": 0, "spec": {"r": 4}}


def _force(db_path, run_id, **values) -> None:
    """Overwrite columns of a row directly, as another (maybe dead) process would have left it."""
    with sqlite3.connect(db_path) as con:
        assignments = ", ".join(f"{k} = ?" for k in values)
        con.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values.values(), run_id))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        yield s


def test_claim_finish_and_skip(store):
    assert store.claim("a", FIELDS) == "claimed"
    assert store.status("a") == "running"
    assert store.finish("a", "done", {"best": {"accuracy": 0.5}, "history": [{"step": 1, "loss": 0.7}]})
    assert store.claim("a", FIELDS) == "done"  # finished: never redone
    row = store.get("a")
    assert row["best"] == {"accuracy": 0.5} and row["spec"] == {"r": 4} and row["finished"] >= row["started"]
    assert store.claim("b", FIELDS) == "claimed"
    assert store.finish("b", "failed", {"error": "RuntimeError: x", "traceback": "Traceback ..."})
    assert store.claim("b", FIELDS) == "claimed"  # failed runs are redone
    assert store.get("b")["error"] is None and store.get("b")["status"] == "running"
    assert [r["run_id"] for r in store.runs()] == ["a"]  # only done runs by default
    assert len(store.runs(status=None)) == 2


def test_dead_process_run_is_redone(store, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim("a", FIELDS)
    _force(tmp_path / "r.sqlite", "a", pid=dead.pid, proc_start=None)
    assert not process_alive(dead.pid)
    assert store.claim("a", FIELDS) == "claimed"
    assert store.get("a")["pid"] == os.getpid()


def test_live_process_run_is_left_alone_but_a_reused_pid_is_not(store, tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_start(live.pid)
        store.claim("a", FIELDS)
        _force(tmp_path / "r.sqlite", "a", pid=live.pid, proc_start=started)
        assert store.claim("a", FIELDS) == "busy"
        if started is not None:  # Linux: the pid now belongs to a newer process than the one that claimed
            _force(tmp_path / "r.sqlite", "a", proc_start=started - 1)
            assert store.claim("a", FIELDS) == "claimed"
        _force(tmp_path / "r.sqlite", "a", pid=live.pid, host="another-host")
        assert store.claim("a", FIELDS) == "claimed"  # can't check another host: taken over (see the docstring)
    finally:
        live.kill()
        live.wait()


def test_finish_writes_only_its_own_claim(store, tmp_path):
    store.claim("a", FIELDS)
    _force(tmp_path / "r.sqlite", "a", host="another-host", pid=1)  # taken over meanwhile
    assert not store.finish("a", "done", {"best": {"accuracy": 1.0}})
    row = store.get("a")
    assert row["status"] == "running" and row["best"] is None and row["host"] == "another-host"


def _claim_all(path, run_ids, queue) -> None:
    store = Store(path)
    mine = []
    for run_id in run_ids:
        if store.claim(run_id, FIELDS) == "claimed":
            mine.append(run_id)
            store.finish(run_id, "done", {"best": {"accuracy": 1.0}, "history": [{"pid": os.getpid()}]})
    store.close()
    queue.put(mine)


def test_concurrent_processes_each_run_is_claimed_once(tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path).close()
    run_ids = [f"run{i:03d}" for i in range(60)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_claim_all, args=(path, run_ids, queue)) for _ in range(4)]
    for w in workers:
        w.start()
    claimed = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    flat = [r for mine in claimed for r in mine]
    assert sorted(flat) == run_ids  # every run claimed by exactly one process
    with Store(path) as store:
        rows = store.runs(status=None)
        assert len(rows) == 60 and {r["status"] for r in rows} == {"done"}
        assert (store.db.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"


def test_old_store_gets_new_columns_and_keeps_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, sweep TEXT, label TEXT, method TEXT, task TEXT, "
                    "seed INTEGER, model TEXT, status TEXT NOT NULL, spec TEXT, budget TEXT, trainable TEXT, "
                    "best TEXT, final TEXT, best_step INTEGER, history TEXT, method_report TEXT, wall_s REAL, "
                    "train_s REAL, tokens_per_s REAL, peak_mem_bytes INTEGER, mem_kind TEXT, steps INTEGER, "
                    "median_step_s REAL, error TEXT, traceback TEXT, host TEXT, pid INTEGER, started REAL, "
                    "finished REAL, artifacts TEXT)")
        con.execute("INSERT INTO runs (run_id, status, best, host, pid) VALUES ('old', 'done', '{\"accuracy\": 0.9}', "
                    "?, 1)", (socket.gethostname(),))
    with Store(path) as store:
        assert store.get("old")["best"] == {"accuracy": 0.9}
        assert store.claim("new", FIELDS) == "claimed" and store.get("new")["proc_start"] == process_start(os.getpid())


def test_not_a_store_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(ConfigError, match=r"notes\.sqlite: not a peftbench results store"):
        Store(path)


def test_structured_columns_are_json_text(store, tmp_path):
    import numpy as np

    store.claim("a", FIELDS)
    store.finish("a", "done", {"best": {"accuracy": np.float32(0.5)}, "trainable": {"adapter": np.int64(3)},
                               "method_report": {"ranks": np.array([1, 2])}})
    with sqlite3.connect(tmp_path / "r.sqlite") as con:
        best, trainable, report = con.execute("SELECT best, trainable, method_report FROM runs").fetchone()
    assert json.loads(best) == {"accuracy": 0.5} and json.loads(trainable) == {"adapter": 3}
    assert json.loads(report) == {"ranks": [1, 2]}


def test_process_start_identifies_a_process():
    me = process_start(os.getpid())
    if me is None:
        pytest.skip("no /proc on this system")
    assert process_start(os.getpid()) == me and process_alive(os.getpid(), me)
    assert not process_alive(os.getpid(), me + 1)
