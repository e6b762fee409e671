"""Helpers shared by the test files (``from helpers import ...``: pytest puts tests/ on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

from peftbench.config import Config
from peftbench.hookspecs import hookimpl
from peftbench.runner import make_host, run_sweep
from peftbench.runs import EVALUATION, SELECTION
from peftbench.store import Store


class CrashAtStep:
    """A plugin that raises once training reaches optimizer step ``step`` (a crash in the middle of an epoch)."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def peftbench_after_optimizer_step(self, state):
        if state.step + 1 == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def train_sweep(config: Config, *plugins):
    """Run a sweep quietly into its store, with ``plugins`` (observers) registered too; it must finish. Returns
    the host and the stored runs (tests of what comes after training: costs, exports, tables, reports)."""
    from peftbench.host import PluginInfo

    host = make_host(config)
    for i, plugin in enumerate(plugins):
        host.add_plugin(plugin, PluginInfo(f"plugin{i}", "object"))
    with Store(config.output.db) as store:
        assert run_sweep(config, host, store, progress=False, log=lambda *a: None).ok
        return host, store.runs()


def train_one(config: Config):
    """Run a one-run sweep quietly into its store; returns the host and the stored run."""
    host, (run,) = train_sweep(config)
    return host, run


def compile_without_codegen(monkeypatch) -> list:
    """Make ``train.compile`` use AOTAutograd without code generation (inductor needs minutes per run on two CPU
    cores and a C compiler): the same dynamo tracing and forward/backward graphs. Returns the list of modules
    compiled from then on (a test can check that compile ran)."""
    from torch import nn

    compiled, original = [], nn.Module.compile

    def compile_(self, *args, **kwargs):
        compiled.append(self)
        original(self, backend="aot_eager")

    monkeypatch.setattr(nn.Module, "compile", compile_)
    return compiled


# -- the HTML report: a synthetic store and a real browser -------------------------------------------------

#: GLUE tasks with their main metrics (as the glue plugin names them), for synthetic stores
GLUE_METRICS = {"mnli": "accuracy", "sst2": "accuracy", "cola": "matthews", "qqp": "accuracy", "qnli": "accuracy",
                "rte": "accuracy", "mrpc": "accuracy", "stsb": "corr"}


def synthetic_store(path, tasks=tuple(GLUE_METRICS), methods=("lora", "adalora", "prilora", "prunedlora", "full"),
                    seeds=(0, 1, 2, 3, 4)):
    """A store of finished runs with plausible fields, written through :class:`Store` (no training): one run
    per method × task × seed, with histories, rank reports, audits and costs. Returns the number of runs."""
    import random

    rng = random.Random(0)
    modules = [f"deberta.encoder.layer.{i}.attention.self.{k}" for i in range(12) for k in ("query_proj", "value_proj")]
    store = Store(path)
    n = 0
    for m, method in enumerate(methods):
        target = None if method == "full" else 1_327_104
        for task in tasks:
            metric = GLUE_METRICS.get(task, "accuracy")
            for seed in seeds:
                n += 1
                run_id = f"{n:04d}{method[:4]}{task[:4]}{seed}".ljust(16, "0")[:16]
                score = 0.6 + 0.05 * m + 0.02 * rng.random()
                final = (target or 184_000_000) + rng.randint(-2000, 2000)
                history = [{"step": s, "epoch": s // 50, "loss": 1.0 / (1 + s / 40) + 0.02 * rng.random(), "lr": 5e-4,
                            "rank": 8.0} for s in range(10, 210, 10)]
                history += [{"step": s, "epoch": s // 50, metric: score - 0.1 * (200 - s) / 200, "in_budget": s >= 100}
                            for s in (50, 100, 150, 200)]
                report = {}
                if method in ("adalora", "prilora", "prunedlora"):
                    report["ranks"] = {mod: rng.randint(2, 12) for mod in modules}
                    report["rank_history"] = [{"step": s, "ranks": {mod: max(2, 12 - s // 25) for mod in modules}}
                                              for s in (0, 50, 100, 150, 200)]
                spec = {"method": method, "task": task, "seed": seed, "label": method, "selection": SELECTION,
                        "evaluation": EVALUATION,
                        "params": {"r": 8} if method != "full" else {}, "data": {"train": "ab12", "dev": "cd34"},
                        "model": {"name_or_path": "microsoft/deberta-v3-base"},
                        "train": {"lr": 5e-4 if method != "full" else 2e-5, "epochs": 3, "batch_size": 32,
                                  "device": "auto", "precision": "auto"}}
                store.claim(run_id, {"sweep": "glue", "label": method, "method": method, "task": task, "seed": seed,
                                     "model": "microsoft/deberta-v3-base", "spec": spec,
                                     "budget": {"target": target, "matched": target is not None}})
                store.finish(run_id, "done", {
                    "best": {metric: score}, "final": {metric: score - 0.01}, "best_any": {metric: score + 0.005},
                    "best_step": 200, "best_any_step": 150, "in_budget_from": 100, "evaluations": 4,
                    "in_budget_evals": 3, "history": history, "method_report": report, "steps": 200,
                    "trainable": {"adapter": final, "head": 1538}, "wall_s": 600 + 60 * m, "train_s": 500 + 50 * m,
                    "tokens_per_s": 9000 - 800 * m, "peak_mem_bytes": (6 + m) * 2 ** 30, "mem_kind": "cuda_max_allocated",
                    "median_step_s": 0.1 + 0.03 * m, "adapter_bytes": 4 * final,
                    "audit": {"target": target, "tolerance": 0.01, "final": final, "peak": final, "nonzero": final,
                              "miss": None if target is None else (final - target) / target,
                              "ok": None if target is None else True, "reference": target is None or None}})
    store.close()
    return n


def chromium_path():
    """Chromium's executable (the Debian package's, or $PEFTBENCH_CHROMIUM), or ``None``."""
    import os
    import shutil

    return os.environ.get("PEFTBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(page, screenshot=None):
    """Open ``page`` (a local HTML file) in headless Chromium through playwright and report what rendered:
    ``{"errors": console errors and uncaught exceptions, "images": [(alt, naturalWidth)], "tables": {id: rows},
    "sorted": the first column of the comparison after clicking its avg header}``; ``screenshot``: save a
    full-page PNG there. Skips the calling test when playwright or Chromium is missing."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api", reason="the report's browser test needs playwright "
                                   "(pip install 'peftbench[report]')")
    executable = chromium_path()
    if not executable:
        pytest.skip("the report's browser test needs Chromium (apt-get install -y chromium, or set PEFTBENCH_CHROMIUM)")
    from pathlib import Path

    errors = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1300, "height": 900})
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            tab.goto(Path(page).resolve().as_uri(), wait_until="load")
            images = tab.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete ? i.naturalWidth : 0])")
            tables = tab.eval_on_selector_all("table[id]", "ts => Object.fromEntries(ts.map(t => [t.id, t.tBodies[0].rows.length]))")
            sorted_labels = None
            if tab.query_selector("#comparison"):
                tab.click("#comparison thead th:has-text('avg')")
                tab.click("#comparison thead th:has-text('avg')")  # twice: descending
                sorted_labels = tab.eval_on_selector_all("#comparison tbody tr", "rs => rs.map(r => r.cells[0].textContent)")
            if screenshot:
                tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "images": images, "tables": tables, "sorted": sorted_labels}


# -- trackers ----------------------------------------------------------------------------------------------

from peftbench.trackers import Tracker  # noqa: E402


class ExplodingTracker(Tracker):
    """A tracker that raises in every method it has (``output.trackers: [helpers:ExplodingTracker]``)."""

    name = "exploding"
    calls: list = []

    def start(self):
        ExplodingTracker.calls.append("start")
        raise RuntimeError("tracker down")

    def log_params(self, params):
        raise RuntimeError("tracker down")

    def log_metrics(self, values, step):
        raise RuntimeError("tracker down")

    def finish(self):
        raise RuntimeError("tracker down")


class RecordingTracker(Tracker):
    """Keeps what it is sent, per run id, in ``RecordingTracker.seen`` (a third-party tracker in a few lines)."""

    seen: dict = {}

    def start(self):
        RecordingTracker.seen[self.spec.run_id] = {"params": {}, "metrics": []}

    def log_params(self, params):
        RecordingTracker.seen[self.spec.run_id]["params"] = params

    def log_metrics(self, values, step):
        RecordingTracker.seen[self.spec.run_id]["metrics"].append((step, values))


class BrokenInitTracker(Tracker):
    def __init__(self, spec, run_dir):
        raise RuntimeError("cannot even start")


def tiny_harness_task(tmp_path: Path) -> Path:
    """A folder with a six-question yes/no lm-evaluation-harness task (``tiny_yesno``), for ``--include-path``."""
    import json

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps({"question": f"Is {i} even?", "label": i % 2}) + "\n"
                                              for i in range(6)))
    (tasks / "tiny_yesno.yaml").write_text(
        "task: tiny_yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: ["yes", "no"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    return tasks
