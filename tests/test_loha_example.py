"""The plugin guide's non-LoRA example (examples/loha.py, a local single-file plugin): LoHa passes the
conformance kit, and its export, a native HF PEFT ``LoHaConfig`` built by the plugin, reloads in HF PEFT with
the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import train_one

from peftbench.export import export_run, load_with_peft, rebuild, run_host
from peftbench.testing import check_method, tiny_config

pytest.importorskip("peft")

LOHA = str(Path(__file__).resolve().parent.parent / "examples" / "loha.py")


def test_loha_passes_the_conformance_kit():
    check_method("loha", {"alpha": 4}, plugins=[LOHA])


def test_exported_loha_reloads_in_peft_with_the_same_outputs(tmp_path):
    config = tiny_config(tmp_path, methods=[{"name": "loha", "params": {"alpha": 4}}], train={"epochs": 1},
                         plugins=["peftbench.testing", LOHA])
    _, run = train_one(config)
    assert run["spec"]["params"]["r"] == 2  # LoRA r=4's budget: LoHa spends 2 r (in + out) per module
    host = run_host(run)  # the stored run names its plugins: examples/loha.py comes back without --plugin
    out = export_run(run, tmp_path / "export", host)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LOHA" and adapter_config["r"] == 2
    theirs = load_with_peft(run, out, host)
    assert type(theirs.peft_config["default"]).__name__ == "LoHaConfig"
    ours = rebuild(run, host)[0]
    trained = [m.hada_w2_b for n, m in ours.named_modules() if n.endswith("query")]
    assert trained and all(p.abs().max() > 0 for p in trained)  # A₂ left zero: ΔW ≠ 0, the comparison is real
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, (3, 12), generator=generator),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
