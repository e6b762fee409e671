"""Reliability, round two: results kept when the store stays locked, read-only readers, literal run-id
prefixes, a corrupt token cache rebuilt, split content fingerprints."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
import warnings

import numpy as np
import pytest

from peftbench.data import _fingerprint, cache_dir, content_fingerprint, encode
from peftbench.errors import ConfigError
from peftbench.store import Store, StoreWriteError
from peftbench.task import Split


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_with_one_run(tmp_path, run_id="abc123") -> Store:
    store = Store(tmp_path / "results.sqlite", log=lambda *_: None)
    assert store.claim(run_id, {"sweep": "s", "label": "lora", "method": "lora", "task": "rte", "seed": 0}) == "claimed"
    return store


def test_run_id_prefixes_are_literal(tmp_path):
    store = _store_with_one_run(tmp_path)
    store.finish("abc123", "done", {"best": {"accuracy": 0.5}})
    assert store.get("abc")["run_id"] == "abc123"
    assert store.get("%") is None and store.get("_bc") is None and store.get("a%") is None


def test_locked_store_keeps_the_result_aside_and_the_next_writer_imports_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_STORE_WAIT", "1")
    store = _store_with_one_run(tmp_path)
    messages = []
    store.log = messages.append
    other = sqlite3.connect(tmp_path / "results.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock past our wait
    with pytest.raises(StoreWriteError, match="kept in") as err:
        store.finish("abc123", "done", {"best": {"accuracy": 0.75}})
    assert err.value.exit_code == 1 and any("locked by another program" in m for m in messages)
    pending = tmp_path / "results.sqlite.pending" / "abc123.json"
    assert pending.exists() and store.status("abc123") == "running"
    other.execute("ROLLBACK")
    other.close()
    store.close()
    reopened = Store(tmp_path / "results.sqlite", log=lambda *_: None)  # what the next `peftbench run` does
    run = reopened.get("abc123")
    assert run["status"] == "done" and run["best"] == {"accuracy": 0.75} and not pending.exists()


def test_a_lock_released_during_the_wait_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_STORE_WAIT", "30")
    store = _store_with_one_run(tmp_path)
    other = sqlite3.connect(tmp_path / "results.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(1.0, lambda: other.execute("ROLLBACK"))
    releaser.start()
    started = time.monotonic()
    assert store.finish("abc123", "done", {"best": {"accuracy": 0.5}})
    releaser.join()
    assert time.monotonic() - started < 20 and store.get("abc123")["status"] == "done"


def test_readers_never_change_a_foreign_sqlite_file(tmp_path):
    foreign = tmp_path / "other.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE notes (x TEXT)")
    db.commit()
    db.close()
    before = _digest(foreign)
    with pytest.raises(ConfigError, match="not a peftbench results store"):
        Store(foreign, readonly=True)
    with pytest.raises(ConfigError, match="not a peftbench results store"):
        Store(foreign)  # a writer refuses it too, before adding a table or switching it to WAL
    assert _digest(foreign) == before
    assert sqlite3.connect(foreign).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with pytest.raises(ConfigError, match="does not exist"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_read_only_store_reads_without_writing(tmp_path):
    store = _store_with_one_run(tmp_path)
    store.finish("abc123", "done", {"best": {"accuracy": 0.5}})
    store.close()
    path = tmp_path / "results.sqlite"
    before = _digest(path)
    reader = Store(path, readonly=True)
    assert [r["run_id"] for r in reader.runs()] == ["abc123"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.db.execute("CREATE TABLE x (y)")
    reader.close()
    assert _digest(path) == before


def test_corrupt_token_cache_is_a_miss_rebuilt_with_one_warning(tmp_path):
    from transformers import AutoTokenizer

    from peftbench.modeling import resolve_name

    tokenizer = AutoTokenizer.from_pretrained(resolve_name("minilm"))
    split = Split([["a small test sentence", "another one here"]], [0.0, 1.0], "<memory>")
    first = encode(split, tokenizer, 32)
    path = cache_dir() / f"{_fingerprint(split, tokenizer, 32)}.npz"
    path.write_bytes(path.read_bytes()[:20])  # truncated: np.load raises EOFError / BadZipFile
    with pytest.warns(UserWarning, match=str(path)):
        again = encode(split, tokenizer, 32)
    assert np.array_equal(again.ids, first.ids) and np.array_equal(again.offsets, first.offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: read back without a warning
        third = encode(split, tokenizer, 32)
    assert np.array_equal(third.ids, first.ids)


def test_content_fingerprint_follows_content_not_path():
    split = Split([["a", "b"], ["c", "d"]], [0.0, 1.0], "/data/RTE/dev.tsv")
    moved = Split([["a", "b"], ["c", "d"]], [0.0, 1.0], "/elsewhere/RTE/dev.tsv")
    relabelled = Split([["a", "b"], ["c", "d"]], [1.0, 1.0], "/data/RTE/dev.tsv")
    rejoined = Split([["ab", ""], ["c", "d"]], [0.0, 1.0], "/data/RTE/dev.tsv")
    assert content_fingerprint(split) == content_fingerprint(moved)
    assert len({content_fingerprint(s) for s in (split, relabelled, rejoined)}) == 3
