"""Sweeps: every run stored with its record; rerunning skips finished runs; the CLI ties it together."""

import sqlite3

from peftbench.cli import main
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config


def test_sweep_stores_runs_and_rerun_skips_finished(tmp_path):
    config = tiny_config(tmp_path, methods=["lora", "full"], seeds=[0, 1], train={"epochs": 1})
    host = make_host(config)
    store = Store(config.output.db)
    first = run_sweep(config, host, store, progress=False, log=lambda *a: None)
    assert (first.done, first.skipped, first.failed) == (4, 0, [])
    rows = store.runs()
    assert {(r["label"], r["seed"]) for r in rows} == {("lora", 0), ("lora", 1), ("full", 0), ("full", 1)}
    lora = next(r for r in rows if r["label"] == "lora")
    assert lora["status"] == "done" and lora["trainable"]["adapter"] == 2 * 4 * (4 * 64 + 2 * 96)
    assert lora["budget"]["target"] == lora["trainable"]["adapter"]
    assert "accuracy" in lora["best"] and lora["history"] and lora["tokens_per_s"] > 0 and lora["wall_s"] > 0
    assert lora["spec"]["params"]["r"] == 4
    second = run_sweep(config, host, store, progress=False, log=lambda *a: None)
    assert (second.done, second.skipped) == (0, 4)
    assert len(store.runs(status=None)) == 4  # nothing duplicated


def test_same_seed_reproduces_metrics_on_cpu(tmp_path):
    a = tiny_config(tmp_path / "a", train={"epochs": 1})
    b = tiny_config(tmp_path / "b", train={"epochs": 1})
    results = []
    for config in (a, b):
        store = Store(config.output.db)
        run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
        results.append(store.runs()[0])
    assert results[0]["run_id"] == results[1]["run_id"]
    assert results[0]["history"] == results[1]["history"]


def test_cli_run_then_table(tmp_path, capfd):
    config = tiny_config(tmp_path, train={"epochs": 1})
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_raw(config)))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "1 run(s) finished" in out and "lora" in out
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "0 run(s) finished, 1 skipped" in capfd.readouterr().out
    assert main(["table", config.output.db, "--format", "csv"]) == 0
    csv_out = capfd.readouterr().out
    assert csv_out.splitlines()[0] == ("method,params,peak,toy (accuracy),avg,median_step_ms,tokens_per_s,peak_mem_mib,"
                                       "train_s,adapter_kib")  # costs by default in CSV
    with sqlite3.connect(config.output.db) as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_cli_bad_input_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [rte]\nmethods: [lorra]\n")
    assert main(["budget", str(path)]) == 2
    assert "unknown method 'lorra'" in capsys.readouterr().err


def _raw(config):
    data = config.to_dict()
    data.pop("source")
    return data
