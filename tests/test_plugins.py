"""Plugin discovery and fault isolation, end to end: real entry points of throwaway installed distributions
(a dist-info folder on ``sys.path``), ``--plugin``, the config's ``plugins:``, API versioning, and
``peftbench plugins``."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml

from peftbench import __version__, hookspecs
from peftbench.cli import main
from peftbench.errors import PluginError
from peftbench.hookspecs import hookimpl
from peftbench.host import Host, PluginInfo
from peftbench.testing import tiny_model_config

REPO = Path(__file__).resolve().parent.parent

HEALTHY = '''
from peftbench.hookspecs import hookimpl
from peftbench.plugins.lora import LoRA

PEFTBENCH_API_VERSION = 1
__version__ = "1.0"


class HealthyLoRA(LoRA):
    name = "healthy_lora"
    description = "a third-party method that works"


@hookimpl
def peftbench_add_methods():
    return [HealthyLoRA]
'''

#: (distribution, module source, what `peftbench plugins` must say about it)
BROKEN = {
    "pb-broken-import": ('import libfoo_that_is_not_installed\n',
                         "import of 'pb_broken_import' failed: ModuleNotFoundError: No module named "
                         "'libfoo_that_is_not_installed'"),
    "pb-wrong-version": ('from peftbench.hookspecs import hookimpl\n'
                         f'PEFTBENCH_API_VERSION = {hookspecs.API_VERSION + 1}\n'
                         '@hookimpl\ndef peftbench_add_methods():\n    return []\n',
                         f"targets peftbench hook API version {hookspecs.API_VERSION + 1}, but peftbench {__version__} implements "
                         f"version {hookspecs.API_VERSION}"),
    "pb-no-version": ('from peftbench.hookspecs import hookimpl\n'
                      '@hookimpl\ndef peftbench_add_methods():\n    return []\n',
                      f"declares no PEFTBENCH_API_VERSION; add `PEFTBENCH_API_VERSION = {hookspecs.API_VERSION}`"),
    "pb-hook-typo": ('from peftbench.hookspecs import hookimpl\nPEFTBENCH_API_VERSION = 1\n'
                     '@hookimpl\ndef peftbench_add_method():\n    return []\n',
                     "invalid hook implementation: unknown hook 'peftbench_add_method' in plugin"),
    "pb-forgot-hookimpl": ('PEFTBENCH_API_VERSION = 1\ndef peftbench_add_methods():\n    return []\n',
                           "peftbench_add_methods is not decorated with @hookimpl"),
    "pb-wrong-args": ('from peftbench.hookspecs import hookimpl\nfrom peftbench.plugins.lora import LoRA\n'
                      'PEFTBENCH_API_VERSION = 1\n'
                      'class Bad(LoRA):\n    name = "bad_args"\n'
                      '    @hookimpl\n    def peftbench_after_backward(self, modle, state):\n        pass\n'
                      '@hookimpl\ndef peftbench_add_methods():\n    return [Bad]\n',
                      "method 'bad_args' (pb_wrong_args.Bad) has invalid hook implementations: Plugin 'method "
                      "class pb_wrong_args.Bad' for hook 'peftbench_after_backward' hookimpl definition: "
                      "peftbench_after_backward(self, modle, state) Argument(s) {'modle'} are declared in the hookimpl "
                      "but can not be found in the hookspec"),
    "pb-raises": ('from peftbench.hookspecs import hookimpl\nPEFTBENCH_API_VERSION = 1\n'
                  '@hookimpl\ndef peftbench_add_methods():\n    raise RuntimeError("kaboom in discovery")\n',
                  "RuntimeError: kaboom in discovery"),
    "pb-not-a-list": ('from peftbench.hookspecs import hookimpl\nfrom peftbench.plugins.lora import LoRA\n'
                      'PEFTBENCH_API_VERSION = 1\n'
                      'class Single(LoRA):\n    name = "single"\n'
                      '@hookimpl\ndef peftbench_add_methods():\n    return Single\n',
                      "peftbench_add_methods must return a list, got type"),
    "pb-not-a-method": ('from peftbench.hookspecs import hookimpl\nPEFTBENCH_API_VERSION = 1\n'
                        '@hookimpl\ndef peftbench_add_methods():\n    return [dict]\n',
                        "which is not a peftbench.method.Method subclass"),
    "pb-duplicate": ('from peftbench.hookspecs import hookimpl\nfrom peftbench.plugins.lora import LoRA\n'
                     'PEFTBENCH_API_VERSION = 1\n'
                     'class Again(LoRA):\n    name = "lora"\n'
                     '@hookimpl\ndef peftbench_add_methods():\n    return [Again]\n',
                     "name(s) already registered by another plugin: lora"),
    "pb-exits": ('import sys\nsys.exit("this plugin exits at import")\n',
                 "SystemExit: this plugin exits at import"),
}


def _module(dist: str) -> str:
    return dist.replace("-", "_")


def _install(site: Path, dist: str, source: str, version: str = "1.0") -> None:
    """A throwaway installed distribution: its module and a dist-info folder with a `peftbench` entry point."""
    module = _module(dist)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[peftbench]\n{module} = {module}\n")


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site-packages")
    _install(site, "pb-healthy", HEALTHY, version="2.3")
    for dist, (source, _) in BROKEN.items():
        _install(site, dist, source)
    return site


@pytest.fixture
def installed(fake_site, monkeypatch):
    """The throwaway distributions importable and discoverable for one test (sys.path restored after)."""
    monkeypatch.syspath_prepend(str(fake_site))
    yield fake_site
    for dist in ["pb-healthy", *BROKEN]:
        sys.modules.pop(_module(dist), None)


def test_every_broken_plugin_is_reported_with_its_reason(installed):
    host = Host()
    failed = {f.name: f for f in host.failed}
    for dist, (_, reason) in BROKEN.items():
        assert _module(dist) in failed, f"{dist} was not reported"
        assert failed[_module(dist)].source == "entry point"
        assert reason in failed[_module(dist)].reason, failed[_module(dist)].reason
    assert failed["pb_broken_import"].traceback  # `peftbench plugins --traceback` shows it


def test_healthy_plugins_load_next_to_broken_ones(installed):
    host = Host()
    assert {"lora", "full", "healthy_lora"} <= set(host.methods)
    assert {"bad_args", "single"}.isdisjoint(host.methods)  # nothing of a failed plugin is registered
    info = host.methods["healthy_lora"].plugin
    assert (info.package, info.version, info.source) == ("pb-healthy", "2.3", "entry point")
    assert host.methods["lora"].obj.__module__ == "peftbench.plugins.lora"  # not shadowed by pb-duplicate
    assert all(host.pm.get_plugin(f.name) is None for f in host.failed)  # and none of its hooks are called


def test_plugins_command_exits_0_and_names_every_failure(installed, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"hook API version {hookspecs.API_VERSION}" in out
    row = next(line for line in out.splitlines() if line.startswith("method") and "healthy_lora" in line)
    assert row.split()[2:5] == ["pb-healthy", "2.3", "entry"]
    assert "count_trainable" in row and "inject" in row and "solve_budget" in row  # LoRA's hooks, inherited
    assert f"plugins that failed to load ({len(BROKEN)}; the others work normally)" in out
    for dist, (_, reason) in BROKEN.items():
        assert f"{_module(dist)} (entry point): " in out and reason in out
    assert "add --traceback" in out

    assert main(["plugins", "--traceback"]) == 0
    out = capsys.readouterr().out
    assert "Traceback (most recent call last)" in out and "libfoo_that_is_not_installed" in out


def _write_config(path: Path, methods: list, plugins: list[str], **extra) -> Path:
    config = {
        "name": "isolation", "model": tiny_model_config(), "tasks": ["toy"], "methods": methods, "seeds": [0],
        "budget": {"lora_rank": 2},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "max_train_samples": 48, "max_eval_samples": 16,
                  "max_length": 32, "num_threads": 1},
        "plugins": plugins, "output": {"db": str(path.parent / "results.sqlite"), "dir": str(path.parent / "runs"),
                                       "save_adapters": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_run_of_a_healthy_method_works_next_to_broken_plugins(installed, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PEFTBENCH_PROGRESS", raising=False)
    config = _write_config(tmp_path / "sweep.yaml", [{"name": "healthy_lora"}, {"name": "lora"}],
                           ["peftbench.testing"])
    assert main(["run", str(config), "--db", str(tmp_path / "results.sqlite"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) finished" in out and "0 failed" in out


def test_asking_for_a_method_of_a_failed_plugin_explains_why(installed, tmp_path, capsys):
    with pytest.raises(PluginError) as info:
        Host().method("bad_args")
    message = str(info.value)
    assert "unknown method 'bad_args'" in message and "plugins that failed to load" in message
    assert "pb_wrong_args (entry point): TypeError: method 'bad_args' (pb_wrong_args.Bad) has invalid hook" in message
    assert f"pb_wrong_version (entry point): targets peftbench hook API version {hookspecs.API_VERSION + 1}" in message

    config = _write_config(tmp_path / "sweep.yaml", [{"name": "bad_args"}], ["peftbench.testing"])
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftbench: error: ") and "unknown method 'bad_args'" in err
    assert "pb_wrong_args (entry point): TypeError" in err  # the reason is right there, not only in `plugins`


# ---------------------------------------------------------------------------------------------------------
# Local, unpackaged plugins: --plugin and the config's plugins:
# ---------------------------------------------------------------------------------------------------------

LOCAL = '''
from peftbench.hookspecs import hookimpl
from peftbench.plugins.lora import LoRA

PEFTBENCH_API_VERSION = 1


class LocalLoRA(LoRA):
    name = "local_lora"


class Observer:
    PEFTBENCH_API_VERSION = 1

    @hookimpl
    def peftbench_on_evaluate(self, metrics):
        pass


observer = Observer()


@hookimpl
def peftbench_add_methods():
    return [LocalLoRA]
'''


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    """A project folder holding `local_plugin.py`, as the current directory, *not* on sys.path (like the
    `peftbench` console script, unlike `python -m`)."""
    (tmp_path / "local_plugin.py").write_text(LOCAL)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file_plugin.py").write_text(LOCAL.replace("local_lora", "file_lora"))
    (tmp_path / "old_plugin.py").write_text(LOCAL.replace("PEFTBENCH_API_VERSION = 1", "PEFTBENCH_API_VERSION = 0")
                                            .replace("local_lora", "old_lora"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    for name in ("local_plugin", "file_plugin", "old_plugin"):
        sys.modules.pop(name, None)


def test_plugin_option_loads_a_module_from_the_current_directory(in_project):
    host = Host(plugins=["local_plugin"])
    assert host.methods["local_lora"].plugin.source == "--plugin"
    assert host.methods["local_lora"].plugin.package == "local_plugin"


def test_plugin_option_loads_a_python_file_and_a_module_attribute(in_project):
    host = Host(plugins=["sub/file_plugin.py", "local_plugin:observer"])
    assert "file_lora" in host.methods
    observer = next(p for p in host.plugins if p.name == "local_plugin:observer")
    assert observer.hooks == ["peftbench_on_evaluate"]


def test_plugin_option_refuses_a_method_class_with_a_clear_error(in_project):
    with pytest.raises(PluginError, match="names the method class LocalLoRA; name its plugin module instead"):
        Host(plugins=["local_plugin:LocalLoRA"])


def test_plugin_option_with_another_api_version_is_a_clear_error(in_project, capsys):
    with pytest.raises(PluginError) as info:
        Host(plugins=["old_plugin"])
    assert "plugin 'old_plugin' (--plugin) refused: targets peftbench hook API version 0" in str(info.value)
    assert f"implements version {hookspecs.API_VERSION}" in str(info.value)
    assert main(["budget", "quickstart", "--plugin", "old_plugin"]) == 2
    assert "refused: targets peftbench hook API version 0" in capsys.readouterr().err


def test_plugins_command_lists_a_failing_plugin_option_instead_of_failing(in_project, capsys):
    assert main(["plugins", "--plugin", "old_plugin", "--plugin", "missing_plugin", "--plugin",
                 "local_plugin:observer"]) == 0
    out = capsys.readouterr().out
    assert "old_plugin (--plugin): targets peftbench hook API version 0" in out
    assert "missing_plugin (--plugin): ModuleNotFoundError: No module named 'missing_plugin'" in out
    assert re.search(r"observer\s+local_plugin:observer\s+.*--plugin\s+on_evaluate", out)


def test_config_plugins_list_loads_local_plugins(in_project):
    from peftbench.config import load_config
    from peftbench.runner import make_host

    path = _write_config(in_project / "local.yaml", [{"name": "local_lora"}],
                         ["peftbench.testing", "local_plugin", "sub/file_plugin.py"])
    host = make_host(load_config(str(path)))
    source = host.methods["local_lora"].plugin.source
    assert "local.yaml" in source and source.endswith("plugins")  # the config file (and line) named it
    assert "file_lora" in host.methods and "toy" in host.tasks


def test_a_plugin_named_twice_is_loaded_once():
    host = Host(plugins=["peftbench.testing", "peftbench.testing", "peftbench.plugins.lora"])
    assert sum(p.name == "peftbench.testing" for p in host.plugins) == 1
    assert not host.failed


# ---------------------------------------------------------------------------------------------------------
# Hook validation details
# ---------------------------------------------------------------------------------------------------------


def test_pluggy_validates_hook_implementations_subsets_specname_and_kwargs_pass():
    class Fine:
        @hookimpl
        def peftbench_after_backward(self, state):
            pass

        @hookimpl(specname="peftbench_train_end")
        def finish(self, model):
            pass

    class Bad:
        @hookimpl(specname="peftbench_train_ends")
        def finish(self, model):
            pass

    class Unmarked:
        def peftbench_train_end(self, model):
            pass

    host = Host(entry_points=False)
    assert host.add_plugin(Fine(), PluginInfo("fine", "object"))
    assert host.plugins[-1].hooks == ["peftbench_after_backward", "peftbench_train_end"]
    assert not host.add_plugin(Bad(), PluginInfo("bad", "object"))
    assert host.failed[-1].reason.startswith("invalid hook implementation: unknown hook 'peftbench_train_ends'")
    assert not host.add_plugin(Unmarked(), PluginInfo("unmarked", "object"))
    assert host.failed[-1].reason == ("invalid hook implementation: peftbench_train_end is not decorated with "
                                      "@hookimpl (from peftbench.hookspecs), so it would never be called")
    assert [p for p in host.pm.get_plugins() if isinstance(p, (Bad, Unmarked))] == []  # refused: unregistered


def test_the_docs_quote_every_hook_with_its_signature():
    """docs/writing-a-method-plugin.md stays accurate to peftbench/hookspecs.py."""
    doc = (REPO / "docs" / "writing-a-method-plugin.md").read_text()
    for name in dir(hookspecs):
        spec = getattr(hookspecs, name)
        if not hasattr(spec, "peftbench_spec"):
            continue
        signature = f"{name}({', '.join(inspect.signature(spec).parameters)})"
        assert signature in doc, f"the plugin guide does not quote {signature}"
    assert f"PEFTBENCH_API_VERSION = {hookspecs.API_VERSION}" in doc


def _public_names_used(path: Path) -> set[str]:
    """The peftbench names a plugin module uses: ``from peftbench.x import name``, ``toolkit.name`` of an
    ``import peftbench.x as toolkit``, and ``Method.name`` for every base-class method it overrides."""
    import ast

    from peftbench.method import Method

    tree, names, aliases = ast.parse(path.read_text()), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("peftbench.") \
                and not node.module.startswith("peftbench.plugins"):
            names |= {a.name for a in node.names if not a.name.startswith("_")}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("peftbench.") and a.asname}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "Method" for b in node.bases):
            names |= {f"Method.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)
                      and not f.name.startswith("_") and callable(getattr(Method, f.name, None))}
    return names


def test_the_guide_lists_every_public_name_the_built_in_methods_use():
    """A plugin author finds in docs/writing-a-method-plugin.md every peftbench name the built-in methods import
    (and the example plugins: the DoRA package, the LoHa file)."""
    doc = (REPO / "docs" / "writing-a-method-plugin.md").read_text()
    sources = [*(REPO / "plugins").rglob("*.py"), *(REPO / "examples").rglob("*.py")]
    used = {name: path for path in sources for name in _public_names_used(path)}
    assert {"Method.describe", "replace_module", "scale_range", "departures", "ConfigError", "Dropout"} <= set(used)
    missing = sorted(f"{name} ({used[name].relative_to(REPO)})" for name in used
                     if not re.search(rf"`{re.escape(name)}\b", doc))
    assert not missing, f"the plugin guide does not name: {', '.join(missing)}"


def test_the_docs_code_excerpts_match_the_example_package():
    """Every code block marked ``<!-- from: PATH -->`` in the guide is a verbatim excerpt of that file."""
    doc = (REPO / "docs" / "writing-a-method-plugin.md").read_text()
    blocks = re.findall(r"<!-- from: (\S+) -->\n```\w*\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 3
    for path, block in blocks:
        source = (REPO / path).read_text()
        for chunk in block.split("\n...\n"):  # verbatim, indentation included
            assert chunk.strip("\n") in source, f"{path}: the guide's excerpt is not in the file:\n{chunk}"
