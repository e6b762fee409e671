"""plugins/ and tasks/ ship as peftbench.plugins / peftbench.tasks, never as top-level names."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_under_peftbench():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    assert all(name.startswith("peftbench") for name in listed)
    found = set()
    for prefix, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([prefix, *relative.parts]))
    assert found == listed


def test_builtins_are_registered_through_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="peftbench")}
    assert names["lora"] == "peftbench.plugins.lora" and names["glue"] == "peftbench.tasks.glue"
    import importlib.util

    assert importlib.util.find_spec("plugins") is None or "site-packages" not in str(importlib.util.find_spec("plugins").origin)
