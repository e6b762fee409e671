"""Cost next to accuracy: every finished run stores its step time, throughput, training time, its own peak
memory and its exported adapter's size; `peftbench table` shows them per method, `peftbench plot` draws the
Pareto figures."""

import re
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers import train_sweep

from peftbench.cli import main
from peftbench.costs import PeakMemory, rss_bytes
from peftbench.export import export_run
from peftbench.hookspecs import hookimpl
from peftbench.store import Store
from peftbench.tables import build
from peftbench.testing import tiny_config

COSTS = ("median_step_s", "tokens_per_s", "train_s", "peak_mem_bytes", "adapter_bytes")
MiB = 2 ** 20
linux = pytest.mark.skipif(rss_bytes() is None, reason="per-run CPU memory reads /proc/self/statm (Linux)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """LoRA, PrunedLoRA (ranks shrink during training) and full fine-tuning, one tiny run each."""
    tmp = tmp_path_factory.mktemp("cost")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTBENCH_CACHE", str(tmp / "cache"))
        config = tiny_config(tmp, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}},
                                           {"name": "prunedlora", "params": {"prune_every": None}},
                                           {"name": "full"}])
        host, runs = train_sweep(config)
        yield config, host, {run["label"]: run for run in runs}


def test_every_cost_is_stored_and_positive(sweep):
    _, _, runs = sweep
    for run in runs.values():
        assert all(run[key] > 0 for key in COSTS), {key: run[key] for key in COSTS}
        assert run["mem_kind"] in ("cpu_peak_rss_delta", "cuda_max_allocated")
    # full fine-tuning ships every weight: far more than an adapter
    assert runs["full"]["adapter_bytes"] > 50 * runs["lora"]["adapter_bytes"]
    for run in runs.values():  # average and 99th percentile of the memory in use, as HF PEFT's comparison reports
        stats = run["mem_stats"]
        assert stats["samples"] > 0 and 0 <= stats["avg"] <= stats["p99"] <= run["peak_mem_bytes"]


def test_memory_stats_are_the_average_and_99th_percentile_of_the_samples():
    from peftbench.costs import PeakMemory

    memory = PeakMemory(cpu=True)
    assert memory.stats() is None
    memory.samples = list(range(1, 201))  # 200 samples: the 99th percentile is the 199th smallest
    assert memory.stats() == {"avg": 100, "p99": 199, "samples": 200}


def test_adapter_bytes_is_the_size_of_the_exported_file(sweep, tmp_path):
    pytest.importorskip("peft")
    _, host, runs = sweep
    for label in ("lora", "prunedlora"):  # PrunedLoRA: the best evaluation's ranks, not the final ones
        out = export_run(runs[label], tmp_path / label, host)
        assert runs[label]["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    full = runs["full"]
    assert full["adapter_bytes"] == (Path(full["artifacts"]) / "trainable.safetensors").stat().st_size


def test_tables_show_the_costs(sweep, capsys):
    config, _, runs = sweep
    main_metric = {"toy": "accuracy"}
    header, *rows = build(list(runs.values()), main_metric, "csv").splitlines()
    names = header.split(",")
    costs = ["median_step_ms", "tokens_per_s", "peak_mem_mib", "train_s", "adapter_kib"]
    assert names[-5:] == costs  # in CSV by default
    for row in rows:
        assert all(float(cell) > 0 for cell in row.split(",")[-5:]), row
    assert "step ms" not in build(list(runs.values()), main_metric)  # markdown stays narrow by default

    assert main(["table", config.output.db, "--plugin", "peftbench.testing", "--cost"]) == 0
    table = capsys.readouterr().out
    assert "| step ms" in table.replace("  ", " ") or "step ms" in table.splitlines()[0]
    assert "peak memory (CPU: the process' peak RSS over the run" in table or "GPU" in table
    lora = next(line for line in table.splitlines() if line.startswith("| lora"))
    assert re.search(r"\d+\.\d (KiB|MiB)", lora)


@linux
def test_cpu_peak_memory_is_per_run(tmp_path):
    """The first run holds 256 MiB more during training than the second: the second's peak is its own, not
    the process' peak since the sweep began."""

    class Ballast:
        @hookimpl
        def peftbench_train_start(self, state):
            self.ballast = torch.ones(64 * MiB) if state.seed == 0 else None  # 256 MiB, touched

        @hookimpl
        def peftbench_train_end(self):
            self.ballast = None

    config = tiny_config(tmp_path, seeds=[0, 1], train={"epochs": 1, "device": "cpu"})
    _, runs = train_sweep(config, Ballast())
    first, second = sorted(runs, key=lambda run: run["seed"])
    assert first["mem_kind"] == second["mem_kind"] == "cpu_peak_rss_delta"
    assert first["peak_mem_bytes"] > 256 * MiB
    assert second["peak_mem_bytes"] < first["peak_mem_bytes"] - 200 * MiB


@linux
def test_peak_memory_sees_what_a_block_held():
    with PeakMemory(cpu=True, interval=0.01) as memory:
        held = torch.ones(32 * MiB)  # 128 MiB for a few samples
        memory._stop.wait(0.1)
        del held
        peak, kind = memory.peak()
    assert kind == "cpu_peak_rss_delta" and peak > 120 * MiB
    with PeakMemory(cpu=True, interval=0.01) as memory:
        peak, _ = memory.peak()
    assert peak < 64 * MiB  # nothing new held: the earlier block's peak is not inherited


def test_plot_writes_a_pareto_figure_with_one_point_per_method(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from peftbench.plots import plot_all

    _, _, runs = sweep
    written = plot_all(list(runs.values()), {"toy": "accuracy"}, tmp_path)
    assert {tmp_path / "pareto_toy.png", tmp_path / "pareto_toy.svg"} <= set(written)
    svg = (tmp_path / "pareto_toy.svg").read_text()
    for panel in ("params", "memory", "step"):
        assert sorted(re.findall(rf'id="pareto-{panel}-([^"]+)"', svg)) == sorted(runs)


def test_an_old_store_gets_the_adapter_bytes_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, sweep TEXT, label TEXT, method TEXT, task TEXT, "
                    "seed INTEGER, model TEXT, status TEXT NOT NULL, spec TEXT, best TEXT, final TEXT)")
    with Store(path) as store:
        assert "adapter_bytes" in {row["name"] for row in store.db.execute("PRAGMA table_info(runs)")}
