"""Reliability, round three (issue 31): pending result files parsed before they reach the SQL, trackers that
cannot change training, bounded generation caps, data errors that name the file and line, and the probe list
of the round: commands people type, with the exit code and message each must give."""

from __future__ import annotations

import json

import pytest

from peftbench.store import Store, _parse_pending


def _store_with_runs(tmp_path) -> Store:
    store = Store(tmp_path / "results.sqlite", log=lambda *_: None)
    for run_id, best in (("done1", 0.5), ("done2", 0.6)):
        store.claim(run_id, {"sweep": "s", "label": "lora", "method": "lora", "task": "toy", "seed": 0})
        store.finish(run_id, "done", {"best": {"accuracy": best}})
    store.claim("open1", {"sweep": "s", "label": "lora", "method": "lora", "task": "toy", "seed": 1})
    return store


# -- 1. a pending file can only write a run's outcome, through fixed column names -------------------------

@pytest.mark.parametrize("content", [
    {"status": "done", "best = ? WHERE run_id != ? --": "{\"accuracy\": 0.999}"},  # SQL in a key
    {"bogus": 1},
    [1, 2, 3],
    {"status": "done", "best_step": "3"},  # a wrong type
    {"status": "done", "best": "not json"},
    {"status": "done", "run_id": "other"},  # a run's identity is not a result
    {"status": "running"},
])
def test_a_bad_pending_file_is_moved_aside_and_never_blocks_the_store(tmp_path, content):
    _store_with_runs(tmp_path).close()
    pending = tmp_path / "results.sqlite.pending"
    pending.mkdir()
    (pending / "open1.json").write_text(json.dumps(content))
    messages = []
    store = Store(tmp_path / "results.sqlite", log=messages.append)  # what the next `peftbench run` does
    assert [r["best"] for r in store.runs()] == [{"accuracy": 0.5}, {"accuracy": 0.6}]
    assert store.status("open1") == "running"
    assert not (pending / "open1.json").exists() and (pending / "open1.json.bad").exists()
    assert any("not importing" in m and "open1.json.bad" in m for m in messages)
    store.close()
    Store(tmp_path / "results.sqlite", log=messages.append).close()  # and the next one opens quietly


def test_a_good_pending_file_is_imported(tmp_path):
    _store_with_runs(tmp_path).close()
    pending = tmp_path / "results.sqlite.pending"
    pending.mkdir()
    (pending / "open1.json").write_text(json.dumps({"status": "done", "best": "{\"accuracy\": 0.7}",
                                                    "best_step": 4, "wall_s": 1, "finished": 2.5}))
    store = Store(tmp_path / "results.sqlite", log=lambda *_: None)
    assert store.get("open1")["best"] == {"accuracy": 0.7} and store.get("open1")["best_step"] == 4


def test_parse_pending_checks_types():
    assert _parse_pending({"status": "failed", "error": "x", "traceback": None}) == {
        "status": "failed", "error": "x", "traceback": None}
    with pytest.raises(ValueError, match="best_step"):
        _parse_pending({"status": "done", "best_step": True})
