"""Results other tools read and progress that tells the truth: each run's history.csv, the sweep's
`[i/N]` lines with runs done and an ETA, the progress bar's budget."""

import csv
from types import SimpleNamespace

from peftbench.history import FIXED
from peftbench.observers import ProgressBar
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config


def test_history_csv_holds_the_stored_history_and_the_log_has_an_eta(tmp_path):
    config = tiny_config(tmp_path, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}},
                                            {"name": "prunedlora", "params": {"prune_every": None}}])
    lines = []
    store = Store(config.output.db)
    assert run_sweep(config, make_host(config), store, progress=False, log=lines.append).ok
    runs = store.runs()
    for run in runs:
        with open(tmp_path / "runs" / run["run_id"] / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        header = list(rows[0])
        assert header[:len(FIXED)] == list(FIXED)
        assert len(rows) == len(run["history"])
        for row, entry in zip(rows, run["history"]):
            assert row["kind"] == ("eval" if "in_budget" in entry else "log")
            for key, value in entry.items():
                expected = ("true" if value else "false") if isinstance(value, bool) else repr(value) \
                    if isinstance(value, float) else str(value)
                assert row[key] == expected, (key, row)
            assert all(row[k] == "" for k in header if k not in entry and k != "kind")
    assert "adapter_params" in header and "accuracy" in header  # the PrunedLoRA run: its budget, dev metric
    finished = [line for line in lines if "best in-budget" in line]
    assert "1/2 runs done, ETA " in finished[0] and finished[0].startswith("[1/2]")
    assert finished[1].endswith("2/2 runs done")
    # a second sweep finds both runs finished: nothing left, no ETA to guess
    again = []
    run_sweep(config, make_host(config), store, progress=False, log=again.append)
    assert all("finished earlier" in line for line in again if line.startswith("["))


def test_the_progress_bar_shows_lr_and_the_methods_budget():
    bar = ProgressBar("lora/toy/s0", "accuracy")
    state = SimpleNamespace(total_steps=10, step=4, logs={"rank": 3.5, "adapter_params": 1536.0})
    bar.peftbench_train_start(state=state)
    try:
        bar.peftbench_on_log(state=state, record={"loss": 0.69, "lr": 5e-3})
        shown = str(bar.bar.postfix)
        for part in ("loss=0.6900", "lr=5.00e-03", "rank=3.5", "adapter_params=1,536"):
            assert part in shown, shown
    finally:
        bar.close()
