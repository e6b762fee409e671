"""Connected smoke test: the main job's hub assets, as a user with internet gets them.

Run with ``pytest -m online`` (the default run deselects it). Skipped with a reason when the hub is not
reachable or ``HF_HUB_OFFLINE`` is set. Downloads DeBERTaV3-base's tokenizer and config (a few MB, no
weights) and GLUE RTE's validation split.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from peftbench import hub, modeling
from peftbench.cli import main
from peftbench.config import ModelConfig, load_config

pytestmark = pytest.mark.online

MAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "glue_matched_budget.yaml"


@pytest.fixture(autouse=True)
def _hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        pytest.skip("HF_HUB_OFFLINE is set: unset it to run the online tests")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=10).close()
    except OSError as exc:
        pytest.skip(f"the Hugging Face hub is not reachable from here ({exc})")
    modeling._hub_unreachable.cache_clear()


def test_main_config_tokenizer_loads_from_the_hub():
    config = load_config(str(MAIN_CONFIG))
    assert config.model.name_or_path == hub.DEBERTA_V3_BASE
    tokenizer = modeling.load_tokenizer(config.model)  # spm.model only: needs sentencepiece + protobuf
    ids = tokenizer("A man is playing a guitar.", "Someone plays music.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    assert tokenizer.unk_token_id not in ids


def test_hub_model_config_matches_the_builtin_shapes():
    hub_config = modeling.load_config(ModelConfig(name_or_path=hub.DEBERTA_V3_BASE), num_labels=2)
    builtin = modeling.BUILTIN_CONFIGS[hub.DEBERTA_V3_BASE]
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads"):
        assert getattr(hub_config, key) == builtin[key], key


def test_one_glue_split_from_the_hub():
    from peftbench.tasks.glue import GLUE_TASKS

    rte = next(t for t in GLUE_TASKS if t.name == "rte")
    dev = rte.load("dev", None)
    assert len(dev) == 277 and dev.source == f"hub:{hub.GLUE}/rte/validation"
    assert set(dev.labels) == {0.0, 1.0}


def test_budget_on_the_real_model_config(monkeypatch, capsys):
    monkeypatch.setattr(modeling, "BUILTIN_CONFIGS", {})  # shapes from the hub's config.json, not the built-in copy
    assert main(["budget", str(MAIN_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "target: 1,327,104 adapter parameters on 72 modules" in out


def test_gated_model_access_is_clear():
    from peftbench.errors import ConfigError

    try:
        config = modeling.load_config(ModelConfig(name_or_path=hub.LLAMA_3_2_1B), num_labels=2)
    except ConfigError as exc:  # no token, or no accepted licence: exit 2 with what to do
        assert "is gated" in str(exc) and "HF_TOKEN" in str(exc) and "huggingface-cli login" in str(exc)
    else:  # this machine has a token with access: the gated config loaded
        assert config.model_type == "llama" and config.num_hidden_layers == 16
