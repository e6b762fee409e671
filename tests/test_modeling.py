"""Model loading checks that run before any training: dtype and the position limit."""

from __future__ import annotations

import pytest
import torch

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.errors import ConfigError
from peftbench.testing import tiny_config, tiny_model_config


@pytest.mark.parametrize("random_init", [True, False])
def test_model_loads_in_fp32_whatever_its_config_says(random_init):
    model = {**tiny_model_config(), "random_init": random_init}
    if not random_init:
        model["config_overrides"] = {}
    mc = ModelConfig(**{**model, "config_overrides": {**model["config_overrides"], "dtype": "bfloat16"}})
    loaded = modeling.load_model(mc, num_labels=2, seed=0)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_max_length_above_the_position_limit_is_a_config_error(tmp_path):
    config = tiny_config(tmp_path, train={"max_length": 600})  # MiniLM's position embeddings cover 512
    with pytest.raises(ConfigError, match=r"train.max_length: 600 .* 512-token position limit"):
        modeling.check_max_length(config)
    modeling.check_max_length(tiny_config(tmp_path, train={"max_length": 512}))


def test_relative_positions_have_no_limit():
    from transformers import AutoConfig

    deberta = AutoConfig.for_model("deberta-v2", position_biased_input=False, max_position_embeddings=512)
    assert modeling.position_limit(deberta) is None
    roberta = AutoConfig.for_model("roberta", max_position_embeddings=514)
    assert modeling.position_limit(roberta) == 512
