"""Hub names, SentencePiece tokenizers and gated models: what a connected user's first run needs.

Offline stand-ins for each hub asset: a SentencePiece-only tokenizer folder (DeBERTaV3's layout), a
monkeypatched ``load_dataset`` that records the id it is asked for, and a ``GatedRepoError`` raised where the
hub would raise it. The same paths against the real hub are in tests/test_online.py (``pytest -m online``).
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftbench import hub, modeling
from peftbench.cli import main
from peftbench.config import ModelConfig
from peftbench.errors import ConfigError
from peftbench.testing import tiny_model_config

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("peftbench", "plugins", "tasks", "benchmarks", "examples")
HUB_CALLS = {"load_dataset", "from_pretrained"}


# -- hub names: current and namespaced, in one place -----------------------------------------------------


def test_every_hub_id_is_namespaced_and_current():
    for name in hub.ALL:
        assert name.count("/") == 1 and all(name.split("/")), f"{name!r} is not an org/name hub id"
        assert name not in hub.LEGACY, f"{name!r} is a retired name"
    assert set(hub.LEGACY.values()) <= set(hub.ALL)
    assert hub.GLUE == "nyu-mll/glue" and hub.GSM8K == "openai/gsm8k" and hub.METAMATHQA == "meta-math/MetaMathQA"


def bare_hub_names(source: str) -> list[str]:
    """String literals passed first to ``load_dataset``/``from_pretrained`` that are legacy or bare names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        first = node.args[0]
        if func in HUB_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            name = first.value
            if name in hub.LEGACY or ("/" not in name and not name.startswith(".")):
                found.append(name)
    return found


def test_scanner_catches_a_bare_legacy_name():
    # the scan below would pass vacuously if it never recognised a call: show that it does
    assert bare_hub_names('datasets.load_dataset("glue", "rte")') == ["glue"]
    assert bare_hub_names('AutoModel.from_pretrained("deberta-v3-base")') == ["deberta-v3-base"]
    assert bare_hub_names('datasets.load_dataset(hub.GLUE, "rte")') == []
    assert bare_hub_names('load_dataset("nyu-mll/glue", "rte")') == []


def test_no_bare_hub_name_in_the_sources():
    offenders = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            offenders += [f"{path.relative_to(REPO)}: {name!r}" for name in bare_hub_names(path.read_text())]
    assert not offenders, "hub names must be current and namespaced (peftbench/hub.py):\n" + "\n".join(offenders)


def test_no_legacy_model_name_in_the_configs():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model = config.get("model", {})
        for key in ("name_or_path", "tokenizer"):
            name = model.get(key)
            assert name not in hub.LEGACY, f"{path.name}: model.{key} {name!r} is retired; use {hub.current(name)!r}"


def test_glue_asks_the_hub_for_nyu_mll_glue(monkeypatch):
    import datasets
    from peftbench.tasks.glue import GLUE_TASKS

    asked = []

    def fake_load_dataset(name, config, split):
        asked.append((name, config, split))
        return {"sentence1": ["a"], "sentence2": ["b"], "label": [1]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("peftbench.modeling._hub_unreachable", lambda: False)  # a hub that answers
    rte = next(t for t in GLUE_TASKS if t.name == "rte")
    split = rte.load("dev", None)
    assert asked == [("nyu-mll/glue", "rte", "validation")]
    assert split.source == "hub:nyu-mll/glue/rte/validation" and split.labels == [1.0]


# -- SentencePiece-only tokenizers (DeBERTaV3's hub layout) ------------------------------------------------


@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder laid out like microsoft/deberta-v3-base's tokenizer: ``spm.model`` and a tokenizer config naming
    ``DebertaV2Tokenizer``, no ``tokenizer.json`` (so transformers must convert the SentencePiece model)."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is a peftbench dependency; not installed here")
    folder = tmp_path_factory.mktemp("spm-tokenizer")
    text = ["the quick brown fox jumps over the lazy dog", "a man is playing a guitar",
            "peftbench compares methods fairly", "two sentences make a pair"] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=64, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], hard_vocab_limit=False, minloglevel=2)
    (folder / "spm.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "vocab_type": "spm", "do_lower_case": False,
        "split_by_punct": False, "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    return folder


def test_spm_only_tokenizer_loads_through_peftbench(spm_tokenizer_dir):
    tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path="minilm", tokenizer=str(spm_tokenizer_dir)))
    encoded = tokenizer("the quick fox", "a guitar")
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).split() == "the quick fox a guitar".split()


#: run in a child process: sentencepiece and protobuf made unimportable (``find_spec`` answers None for a
#: module set to None in sys.modules, so transformers sees them as not installed), then the CLI
WITHOUT_BACKENDS = """
import sys
sys.modules["sentencepiece"] = None
sys.modules["google.protobuf"] = None
from peftbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_sentencepiece_is_exit_2_naming_the_packages(spm_tokenizer_dir, tmp_path):
    model = {**tiny_model_config(), "tokenizer": str(spm_tokenizer_dir)}
    config = tmp_path / "spm.yaml"
    config.write_text(yaml.safe_dump({
        "name": "spm", "model": model, "tasks": ["toy"], "methods": [{"name": "lora", "params": {"r": 2}}],
        "seeds": [0], "budget": {"lora_rank": 2}, "plugins": ["peftbench.testing"],
        "output": {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")}}))
    done = subprocess.run([sys.executable, "-c", WITHOUT_BACKENDS, "run", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install sentencepiece protobuf" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results.sqlite").exists()  # failed before anything was stored or trained


# -- gated models -----------------------------------------------------------------------------------------


def _gated(name: str) -> OSError:
    """What transformers raises for a gated repo without access: an OSError caused by the hub's GatedRepoError."""
    from huggingface_hub.errors import GatedRepoError

    class Refused(GatedRepoError):  # the hub's error without the HTTP response it is normally built from
        def __init__(self, message):
            OSError.__init__(self, message)

    try:
        raise Refused(f"401 Client Error. Cannot access gated repo for url https://huggingface.co/{name}.")
    except GatedRepoError as cause:
        try:
            raise OSError(f"You are trying to access a gated repo. Make sure to have access to it at "
                          f"https://huggingface.co/{name}.") from cause
        except OSError as exc:
            return exc


def test_gated_model_without_access_is_exit_2_naming_hf_token(tmp_path, monkeypatch, capsys):
    import transformers

    name = hub.LLAMA_3_2_3B

    def refuse(*args, **kwargs):
        raise _gated(name)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    config = tmp_path / "gated.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gated", "model": {"name_or_path": name}, "tasks": ["toy"], "methods": [{"name": "lora"}],
        "seeds": [0], "plugins": ["peftbench.testing"],
        "output": {"db": str(tmp_path / "results.sqlite"), "dir": str(tmp_path / "runs")}}))
    assert main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{name!r} is gated" in err and "HF_TOKEN" in err and "huggingface-cli login" in err
    assert "Traceback" not in err and not (tmp_path / "results.sqlite").exists()
    assert main(["budget", str(config)]) == 0  # peftbench knows Llama-3.2-3B's shapes offline: no hub needed
    capsys.readouterr()
    other = "google/gemma-2-2b"  # gated, no built-in shapes: from the hub, which refuses
    config.write_text(config.read_text().replace(name, other))
    assert main(["budget", str(config)]) == 2  # the same message, no traceback
    assert "HF_TOKEN" in capsys.readouterr().err


def test_gated_error_found_along_the_exception_chain():
    error = modeling.load_error(hub.LLAMA_3_8B, _gated(hub.LLAMA_3_8B))
    assert isinstance(error, ConfigError) and "HF_TOKEN" in str(error)
    plain = modeling.load_error("some-org/missing", OSError("not found"))
    assert "HF_TOKEN" not in str(plain) and "could not be loaded" in str(plain)
    # offline, a known gated family gets the token hint next to the offline advice
    assert hub.is_gated(hub.LLAMA_3_2_1B) and "HF_TOKEN" in str(modeling.load_error(hub.LLAMA_3_2_1B, OSError("x")))
