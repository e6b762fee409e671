"""Plugins written for API version 1 keep working (docs/writing-a-method-plugin.md, "Migrating from API 1"):
the names they imported from ``peftbench.plugins.lora`` resolve to the toolkit's with a DeprecationWarning,
and the host loads them with one note naming what to change. The witness is the DoRA example exactly as it
was written for version 1 (tests/data/dora_api1)."""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import peftbench.plugins.lora as lora_plugin
import pytest

import peftbench.lora as toolkit
from peftbench import hookspecs
from peftbench.conformance import check_method
from peftbench.host import Host

DORA_API1 = Path(__file__).resolve().parent / "data" / "dora_api1"


@pytest.mark.parametrize("module,name", [("peftbench.plugins.lora", "LoRALinear"),
                                         ("peftbench.plugins.lora", "inject_lora"),
                                         ("peftbench.plugins.lora", "lora_layers"),
                                         ("peftbench.plugins.lora", "lora_peft_export"),
                                         ("peftbench.plugins.lora.layer", "LoRALinear"),
                                         ("peftbench.plugins.lora.layer", "MergedLoRAFunction")])
def test_api_1_names_resolve_to_the_toolkit_with_a_deprecation_warning(module, name):
    __import__(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to peftbench\.lora\.{name}.*"
                                                r"declare PEFTBENCH_API_VERSION = 2"):
        assert getattr(sys.modules[module], name) is getattr(toolkit, name)


def test_the_lora_plugin_is_only_the_method_now():
    assert lora_plugin.__all__ == ["LoRA", "LoRAParams"] and lora_plugin.PEFTBENCH_API_VERSION == hookspecs.API_VERSION
    with pytest.raises(AttributeError, match="no attribute 'rank_cost'"):
        lora_plugin.rank_cost  # noqa: B018 - the toolkit's new names are not re-exported here


@pytest.fixture
def dora_api1(tmp_path, monkeypatch):
    """The version 1 DoRA plugin as an importable package ``dora_api1``."""
    shutil.copytree(DORA_API1, tmp_path / "dora_api1")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "dora_api1"
    for name in [m for m in sys.modules if m.split(".")[0] == "dora_api1"]:
        del sys.modules[name]


def test_an_api_1_plugin_loads_with_a_note_then_trains_and_conforms(dora_api1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # not the entry points: the installed, version 2 DoRA example registers the same method name
        host = Host(plugins=["peftbench.testing", dora_api1], entry_points=False)
    notes = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert notes == ["plugin 'dora_api1' (--plugin) targets peftbench API version 1 and runs through a "
                     "compatibility layer; to update it, import the LoRA toolkit from peftbench.lora (not "
                     "peftbench.plugins.lora) and declare PEFTBENCH_API_VERSION = 2"]
    moved = sorted({str(w.message).split(" ")[0] for w in caught if issubclass(w.category, DeprecationWarning)})
    assert moved == ["peftbench.plugins.lora.inject_lora", "peftbench.plugins.lora.layer.LoRALinear",
                     "peftbench.plugins.lora.lora_layers"]
    registered = host.methods["dora"]
    assert registered.plugin.source == "--plugin" and not host.failed
    assert issubclass(sys.modules["dora_api1.layer"].DoRALinear, toolkit.LoRALinear)
    # the kit's short runs: training, counts, budgets, state restore (a saved rank), determinism
    check_method(registered.obj, {"alpha": 8})


def test_unknown_api_versions_are_still_refused(tmp_path, monkeypatch):
    (tmp_path / "api3_plugin.py").write_text("PEFTBENCH_API_VERSION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    host = Host(plugins=["api3_plugin"], entry_points=False, strict=False)
    (failed,) = host.failed
    assert failed.reason.startswith("targets peftbench hook API version 3, but peftbench")
    assert "implements version 2 (and 1 through a compatibility layer)" in failed.reason
    sys.modules.pop("api3_plugin", None)
