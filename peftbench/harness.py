"""``peftbench evaluate RUN_ID --harness TASKS``: EleutherAI's lm-evaluation-harness on a run's adapter.

The run is exported as a PEFT adapter (:func:`peftbench.export.export_run`) and evaluated by lm-eval's own
``hf`` model with ``peft=`` (the harness loads the base model and the adapter itself, so its numbers are those
any user of the exported adapter gets); a full fine-tuning run is exported as its trained model and evaluated
as it is. Every numeric metric lands in the run's ``harness`` column
(``{task: {"metrics": {metric: value}, "samples": n, "checkpoint": "selected", "step": n}}``: the checkpoint
evaluated, by default the run's reported one, that of its table columns and ``generations.jsonl``; ``--checkpoint
final`` results are stored as ``TASK@final``); ``peftbench table`` shows them as columns. lm-eval is an optional extra:
``pip install 'peftbench[harness]'``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from . import modeling
from .errors import ConfigError
from .export import checkpoint_info, export_run
from .host import Host
from .task import GenerationTask


def harness_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` section, per task: ``metrics`` (its ``metric,filter`` numbers, without the
    non-numbers: aliases, ``N/A`` standard errors) and ``samples``, the number of documents evaluated (a count,
    kept apart from the metrics)."""
    out = {}
    for task, values in results.items():
        samples = values.get("sample_len")
        out[task] = {"metrics": {metric: float(value) for metric, value in values.items()
                                 if "," in metric and isinstance(value, (int, float)) and not isinstance(value, bool)},
                     "samples": int(samples) if isinstance(samples, int) and not isinstance(samples, bool) else None}
    return out


def task_results(entry: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """``(metrics, samples)`` of one task's stored harness results (records written before the two were kept
    apart have the count among the metrics, as ``sample_len``)."""
    if "metrics" in entry:
        return entry["metrics"], entry.get("samples")
    return {k: v for k, v in entry.items() if k != "sample_len"}, entry.get("sample_len")


def evaluate_run(run: dict[str, Any], host: Host, tasks: list[str], limit: int | None = None,
                 include_path: str | None = None, batch_size: int = 8, device: str = "cpu",
                 adapter_dir: str | None = None, checkpoint: str = "selected") -> dict[str, dict[str, Any]]:
    """The harness's metrics of ``tasks`` for ``run``'s adapter at ``checkpoint`` (exported:
    :func:`peftbench.export.export_run`) on its base model, each task's saying which checkpoint it is."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--harness needs lm-evaluation-harness: pip install 'peftbench[harness]' "
                          "(or pip install lm-eval)") from None
    if not isinstance(host.task(run["task"]), GenerationTask):
        raise ConfigError(f"run {run['run_id']} is a {run['task']!r} classification run: the harness evaluates "
                          "causal language models")
    spec_model = run["spec"]["model"]
    base = modeling.resolve_name(spec_model["name_or_path"], spec_model.get("gguf_file"))
    if spec_model.get("random_init") or not Path(base).exists() and base in modeling.BUILTIN_CONFIGS:
        raise ConfigError(f"run {run['run_id']}: its base model {base!r} was built with random weights; the harness "
                          "loads a saved model (a local folder or a hub id)")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of examples, got {limit}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path!r} is not a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--harness: unknown lm-eval task(s) {', '.join(map(repr, unknown))} (`lm-eval ls tasks` "
                          "lists them; local YAML tasks need --include-path)")
    with tempfile.TemporaryDirectory(prefix="peftbench-harness-") as scratch:  # removed however the run ends
        adapter = Path(adapter_dir or scratch)
        export_run(run, adapter, host, checkpoint)
        model_args = {"pretrained": base, "peft": str(adapter), "dtype": "float32"}
        if not (adapter / "adapter_config.json").exists():  # full fine-tuning: the exported model itself
            model_args = {"pretrained": str(adapter), "tokenizer": base, "dtype": "float32"}
        if spec_model.get("tokenizer"):
            model_args["tokenizer"] = modeling.resolve_name(spec_model["tokenizer"])
        out = simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), limit=limit,
                              task_manager=manager, batch_size=batch_size, device=device)
    info = checkpoint_info(run, checkpoint)
    return {task: {**entry, "checkpoint": info["checkpoint"], "step": info["step"]}
            for task, entry in harness_metrics(out["results"]).items()}


def harness_columns(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(headers, rows)`` of the harness results of ``runs``: one row per run that has any, one column per
    task and metric (standard errors left out), then each task's number of documents (``task n``)."""
    runs = [r for r in runs if r.get("harness")]
    parsed = [{task: task_results(entry) for task, entry in r["harness"].items()} for r in runs]
    columns = sorted({f"{task}:{metric}" for p in parsed for task, (metrics, _) in p.items()
                      for metric in metrics if "stderr" not in metric})
    tasks = sorted({task for p in parsed for task, (_, n) in p.items() if n is not None})
    rows = []
    for r, p in zip(runs, parsed):
        values = {f"{t}:{m}": v for t, (metrics, _) in p.items() for m, v in metrics.items()}
        rows.append([r["label"], r["task"], r["seed"], r["run_id"][:8],
                     *(f"{values[c]:.4f}" if c in values else "—" for c in columns),
                     *(str(p[t][1]) if t in p and p[t][1] is not None else "—" for t in tasks)])
    return ["method", "task", "seed", "run", *columns, *(f"{t} n" for t in tasks)], rows
