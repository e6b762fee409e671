"""The toy tasks and the tiny model: what tests and the conformance kit train in seconds.

* ``toy`` and ``toy_pair``: small synthetic tasks (no download, no data folder) that a tiny model learns in
  seconds. Load this module as a plugin (``plugins: [peftbench.toys]``; :mod:`peftbench.testing` re-exports
  it, so ``plugins: [peftbench.testing]`` works too).
* :func:`tiny_model_config`: a 2-layer random-init BERT built from a config (MiniLM's tokenizer).
* :func:`tiny_config`: a complete sweep config around both, for end-to-end tests in a few seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config, parse_config
from .hookspecs import API_VERSION, hookimpl
from .task import Split, Task

PEFTBENCH_API_VERSION = API_VERSION  # shipped with peftbench: always the running contract

_POSITIVE = ["good", "great", "fine", "nice", "superb", "happy"]
_NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "dull"]
_FILLER = ["the", "movie", "was", "a", "plot", "and", "actors", "very", "it", "story", "quite", "film"]


@dataclass
class ToyTask(Task):
    """Label 1 when a sentence has more positive than negative words (a pair task compares two sentences)."""

    size: int = 256

    def load(self, split: str, data_dir: str | None) -> Split:
        rng = random.Random({"train": 0, "dev": 1}.get(split, 2))
        n = self.size if split == "train" else self.size // 2
        texts: list[list[str]] = [[] for _ in self.text_fields]
        labels = []
        for _ in range(n):
            scores = []
            for column in texts:
                pos, neg = rng.randint(0, 3), rng.randint(0, 3)
                words = rng.sample(_POSITIVE * 2, pos) + rng.sample(_NEGATIVE * 2, neg)
                words += rng.sample(_FILLER, rng.randint(2, 8))
                rng.shuffle(words)
                column.append(" ".join(words))
                scores.append(pos - neg)
            labels.append(float(scores[0] > (scores[1] if len(scores) > 1 else 0)))
        return Split(texts, labels, f"toy:{self.name}:{split}")

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((np.asarray(predictions) == np.asarray(labels)).mean())}


TOY_TASKS = [ToyTask("toy", ("sentence",), 2, "accuracy", label_names=("neg", "pos")),
             ToyTask("toy_pair", ("sentence1", "sentence2"), 2, "accuracy", label_names=("no", "yes"))]


@hookimpl
def peftbench_add_tasks():
    return TOY_TASKS


def tiny_model_config(layers: int = 2, hidden: int = 32) -> dict[str, Any]:
    return {
        "name_or_path": "minilm",  # its config and tokenizer; the weights are random (random_init)
        "random_init": True,
        "config_overrides": {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                             "num_attention_heads": 4, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0},
    }


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """A 2-layer random-init Llama (``tiny-llama``: :data:`peftbench.modeling.BUILTIN_CONFIGS`) with MiniLM's
    tokenizer, for causal-LM tests and the tiny GSM8K config; ``overrides``: more ``config_overrides``."""
    return {"name_or_path": "tiny-llama", "tokenizer": "minilm", "random_init": True,
            "config_overrides": dict(overrides)}


def tiny_config(tmp_path, methods: list[Any] | None = None, tasks: list[str] | None = None,
                **overrides: Any) -> Config:
    """A sweep config on the toy task and a tiny random model, storing results under ``tmp_path``."""
    data = {
        "name": "tiny",
        "model": tiny_model_config(),
        "tasks": tasks or ["toy"],
        "methods": methods or [{"name": "lora", "params": {"r": 4, "alpha": 8}}],
        "seeds": [0],
        # unit tests evaluate twice per run; the in-budget rule is tested on its own (tests/test_in_budget.py)
        "budget": {"lora_rank": 4, "min_evaluations": 1},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "max_length": 32, "log_every": 2,
                  "num_threads": 1},
        "plugins": ["peftbench.testing"],
        "output": {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, "<tiny_config>")
