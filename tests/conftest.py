import os
from pathlib import Path

import pytest

from peftbench.host import Host, PluginInfo

REPO = Path(__file__).resolve().parent.parent


def glue_dir() -> Path | None:
    """Real GLUE data: $PEFTBENCH_GLUE_DIR, else ../shared/glue beside the repository."""
    candidates = [os.environ.get("PEFTBENCH_GLUE_DIR"), REPO.parent / "shared" / "glue"]
    for c in candidates:
        if c and (Path(c) / "RTE" / "train.tsv").exists():
            return Path(c)
    return None


@pytest.fixture
def glue(monkeypatch) -> Path:
    path = glue_dir()
    if path is None:
        pytest.skip("real GLUE data not found (set PEFTBENCH_GLUE_DIR or place it at ../shared/glue)")
    return path


@pytest.fixture
def host() -> Host:
    """The installed plugins plus the toy tasks of peftbench.testing."""
    import peftbench.testing

    h = Host()
    h.add_plugin(peftbench.testing, PluginInfo("peftbench.testing", "object"))
    return h


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # one token cache per test session: fast, and never the user's ~/.cache
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
