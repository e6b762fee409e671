"""One run on several processes: ``accelerate launch -m peftbench.cli run CONFIG`` with two processes on the
CPU (gloo), against the same config in one process.

Every batch of ``train.batch_size`` is split between the processes (``split_batches``), so a run computes the
same gradients on any number of processes: on the toy task, whose 256 training and 128 dev examples fill
every batch, the two-process run matches the one-process run up to float rounding (the loss of each half
batch is averaged over fewer terms). Where a batch is short, it goes last in its epoch and accelerate fills it
up with examples from the first batch, so results then differ slightly.

``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate only starts several for
``--multi_gpu``, or MPI); ``--multi_gpu`` on a machine without GPUs gives two CPU processes on gloo, which is
what this test runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peftbench.config import parse_config
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_model_config

LORA = {"name": "lora", "params": {"r": 4, "alpha": 8}}


def test_split_batches_use_every_example_once_per_epoch():
    """The short batch goes last, where accelerate fills it up; elsewhere it would skip it."""
    import numpy as np
    from accelerate.data_loader import BatchSamplerShard

    from peftbench.data import LengthGroupedBatchSampler
    from peftbench.trainer import ShortBatchLast

    lengths = np.random.default_rng(0).integers(3, 30, size=70)  # 70 = 4 batches of 16 and one of 6
    for epoch in range(4):
        plain = LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=True, seed=1)
        plain.set_epoch(epoch)
        expected = list(plain)
        short_last = ShortBatchLast(LengthGroupedBatchSampler(lengths, 16, True, True, seed=1))
        shards = []
        for rank in range(2):  # each process has its sampler; accelerate's set_epoch reaches it as `.sampler`
            short_last.sampler.set_epoch(epoch)
            shards.append(list(BatchSamplerShard(short_last, 2, rank, split_batches=True)))
        short_last.sampler.set_epoch(epoch)
        batches = list(short_last)
        assert len(short_last) == 5 and [len(b) for b in batches] == [16, 16, 16, 16, 6]
        assert sorted(map(sorted, batches)) == sorted(map(sorted, expected))  # the same batches, reordered
        # each process gets half of every batch; the short one is filled up from the first batch
        assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [8] * 5
        seen = [i for rank in range(2) for batch in shards[rank] for i in batch]
        assert set(seen) == set(range(70)) and len(seen) == 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep_here(data: dict, **changes) -> dict:
    """Run a variant of the sweep ``data`` in this process, one process; its rows by (label, seed)."""
    config = parse_config({**data, **changes}, "<test>")
    with Store(config.output.db) as store:
        run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
        return {(r["label"], r["seed"]): r for r in store.runs(status=None)}


@pytest.mark.slow
def test_two_processes_train_each_run_together_and_the_main_one_stores_it_once(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    db = tmp_path / "r.sqlite"
    data = {"name": "ddp", "model": tiny_model_config(), "tasks": ["toy"], "methods": [LORA, {"name": "prunedlora", "params": {"prune_every": None}}],
            "seeds": [0, 1], "budget": {"lora_rank": 4, "min_evaluations": 1},
            "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "max_length": 32, "log_every": 2, "num_threads": 1,
                      # the final model, not a held-out validation part: every batch of the 256 examples stays full
                      "select": "final"},
            "plugins": ["peftbench.testing"], "output": {"db": str(db), "dir": str(tmp_path / "runs")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    # one process: the reference run (its own store), and seed 1 finished earlier in the sweep's store
    reference = _sweep_here(data, methods=[LORA], seeds=[0], output={"db": str(tmp_path / "ref.sqlite"),
                                                                       "dir": str(tmp_path / "ref")})[("lora", 0)]
    earlier = _sweep_here(data, methods=[LORA], seeds=[1])[("lora", 1)]

    env = {**os.environ, "PEFTBENCH_PROGRESS": "", "OMP_NUM_THREADS": "1"}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "peftbench.cli", "run", str(path), "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # runs failed (the launcher turns the main's 1 into its 1)

    # the main process alone reports: one line per run, one summary
    assert "2 processes (MULTI_CPU) train each run together" in out
    assert out.count("run(s) finished") == 1, out
    assert "1 run(s) finished, 1 skipped (finished earlier), 2 failed" in out
    assert len(re.findall(r"^\[1/4\] lora toy seed=0 .*: best in-budget accuracy", out, re.M)) == 1
    assert len(re.findall(r"^\[2/4\] lora toy seed=1 .*: finished earlier, skipped$", out, re.M)) == 1
    # methods that replace parameters cannot run under DDP: their runs fail with the reason, the sweep goes on
    assert len(re.findall(r"^\[[34]/4\] prunedlora toy seed=[01] .*: FAILED: RuntimeError: prunedlora replaces "
                          r"parameters during training and supports one process only; ", out, re.M)) == 2

    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM runs")]
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    by_key = {(r["label"], r["seed"]): r for r in rows}
    assert {k: r["status"] for k, r in by_key.items()} == {
        ("lora", 0): "done", ("lora", 1): "done", ("prunedlora", 0): "failed", ("prunedlora", 1): "failed"}
    assert by_key[("lora", 1)]["finished"] == earlier["finished"]  # skipped, not redone

    # the same run as in one process, up to float rounding
    with Store(db) as store:
        ddp = store.get(by_key[("lora", 0)]["run_id"])
    assert ddp["run_id"] == reference["run_id"]
    for key in ("steps", "best_step", "best", "final", "trainable"):
        assert ddp[key] == reference[key], key
    assert [(h["step"], h["epoch"], sorted(h)) for h in ddp["history"]] == \
           [(h["step"], h["epoch"], sorted(h)) for h in reference["history"]]
    for mine, theirs in zip(ddp["history"], reference["history"]):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5), (key, mine, theirs)
    from safetensors.torch import load_file

    weights = [load_file(Path(r["artifacts"]) / "trainable.safetensors") for r in (ddp, reference)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[1])
