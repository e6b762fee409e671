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


def _foreign_sqlite(path):
    """Another program's SQLite file (no peftbench runs table)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x TEXT)")
    db.commit()
    db.close()
    return path


def test_readers_never_change_a_foreign_sqlite_file(tmp_path):
    foreign = _foreign_sqlite(tmp_path / "other.sqlite")
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


# -- the CLI: results tied to their data, paths checked before training, read-only readers -------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

from peftbench.cli import main  # noqa: E402
from peftbench.testing import tiny_model_config  # noqa: E402


def _rte_folder(root, flip_dev: bool = False):
    """A 16-example RTE folder in the GLUE layout (the no-quoting TSV of ../shared/glue)."""
    rows = [(f"a man is playing item {i}", f"someone plays {i}", i % 2) for i in range(16)]
    for split in ("train", "dev"):
        folder = root / "RTE"
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["sentence1\tsentence2\tlabel"]
        lines += [f"{a}\t{b}\t{(1 - y) if flip_dev and split == 'dev' else y}" for a, b, y in rows]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _config_file(tmp_path, name="tiny", **overrides) -> str:
    data = {"name": name, "model": tiny_model_config(), "tasks": ["rte"],
            "methods": [{"name": "lora", "params": {"r": 2, "alpha": 4}}], "seeds": [0], "budget": {"lora_rank": 2},
            "train": {"epochs": 1, "batch_size": 8, "max_length": 32, "num_threads": 1},
            "data_dir": str(tmp_path / "glue"),
            "output": {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")}}
    data.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_changed_data_is_a_new_run_never_averaged_with_the_old(tmp_path, capsys):
    _rte_folder(tmp_path / "glue")
    config = _config_file(tmp_path)
    assert main(["run", config, "--no-progress"]) == 0
    _rte_folder(tmp_path / "glue", flip_dev=True)  # corrected labels: same paths, other content
    assert main(["run", config, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "finished earlier, skipped" not in out and "1 run(s) finished, 0 skipped" in out
    runs = Store(tmp_path / "results.sqlite", readonly=True).runs()
    assert len(runs) == 2 and runs[0]["spec"]["data"]["dev"] != runs[1]["spec"]["data"]["dev"]
    assert main(["table", str(tmp_path / "results.sqlite"), "--format", "plain"]) == 0
    table = capsys.readouterr().out
    assert table.count("lora@") == 2 and "never averaged as seeds" in table
    assert main(["table", str(tmp_path / "results.sqlite"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {tuple(sorted(r["spec"]["data"])) for r in rows} == {("dev", "train")}


def test_a_run_finished_by_another_sweep_appears_in_the_asking_sweeps_table(tmp_path, capsys):
    _rte_folder(tmp_path / "glue")
    assert main(["run", _config_file(tmp_path, name="first"), "--no-progress"]) == 0
    assert main(["run", _config_file(tmp_path, name="second"), "--no-progress"]) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert main(["table", str(tmp_path / "results.sqlite"), "--sweep", "second", "--format", "plain"]) == 0
    assert "lora" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["db_is_dir", "db_parent_is_file", "output_under_file"])
def test_bad_paths_are_exit_2_before_training(tmp_path, capsys, problem):
    _rte_folder(tmp_path / "glue")
    (tmp_path / "afile").write_text("x")
    args, output = [], {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")}
    if problem == "db_is_dir":
        args = ["--db", str(tmp_path)]
    elif problem == "db_parent_is_file":
        args = ["--db", str(tmp_path / "afile" / "results.sqlite")]
    else:
        output["dir"] = str(tmp_path / "afile" / "runs")
    assert main(["run", _config_file(tmp_path, output=output), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("is a directory" in err or "is a file" in err)
    assert not (tmp_path / "results.sqlite").exists()  # nothing stored, nothing trained


def test_readers_and_export_are_exit_2_without_touching_files(tmp_path, capsys):
    foreign = _foreign_sqlite(tmp_path / "other.sqlite")
    before = _digest(foreign)
    assert main(["table", str(foreign)]) == 2 and main(["plot", str(foreign), "--out-dir", str(tmp_path)]) == 2
    assert main(["export", "abc", str(tmp_path / "out"), "--db", str(foreign)]) == 2
    assert _digest(foreign) == before
    (tmp_path / "taken").write_text("x")
    assert main(["export", "abc", str(tmp_path / "taken"), "--db", str(foreign)]) == 2
    assert "is an existing file" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "set"])
def test_control_characters_are_exit_2_with_the_line(tmp_path, capsys, where):
    config = tmp_path / "bad.yaml"
    text = "name: x\ntasks: [rte]\nmethods: [lora]\n"
    if where == "file":
        config.write_text(text + "train: {lr: 1\x07}\n")
        args = []
    else:
        config.write_text(text)
        args = ["--set", "train.lr=1\x00"]
    assert main(["budget", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unprintable character" in err
    assert (f"{config}:4:" in err) if where == "file" else ("--set train.lr:1:" in err)


@pytest.mark.parametrize("nested", [False, True])
def test_misspelled_task_under_per_task_is_a_config_error(tmp_path, capsys, nested):
    if nested:  # a method's per_task holds params/train; the top level's holds training keys
        config = _config_file(tmp_path, methods=[{"name": "lora", "per_task": {"rtee": {"train": {"epochs": 2}}}}])
    else:
        config = _config_file(tmp_path, per_task={"rtee": {"epochs": 2}})
    assert main(["budget", config]) == 2
    err = capsys.readouterr().err
    assert "per_task.rtee" in err and "did you mean 'rte'" in err and f"{config}:" in err


def test_max_length_above_the_position_limit_stops_before_training(tmp_path, capsys):
    _rte_folder(tmp_path / "glue")
    config = _config_file(tmp_path, train={"epochs": 1, "batch_size": 8, "max_length": 1024})
    assert main(["run", config, "--no-progress"]) == 2
    assert "512-token position limit" in capsys.readouterr().err
    assert not (tmp_path / "results.sqlite").exists()


def test_a_run_left_running_by_a_dead_process_is_reported(tmp_path):
    store = _store_with_one_run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.db.execute("UPDATE runs SET pid = ?, proc_start = NULL WHERE run_id = 'abc123'", (dead.pid,))
    assert store.abandoned(["abc123"]) == ["abc123"]
