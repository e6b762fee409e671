"""Running a sweep: budget check, grid expansion, one run after another, every result in the store.

A run that raises (diverges, runs out of memory, a plugin bug) is stored as ``failed`` with its reason and
traceback, and the sweep goes on (unless ``fail_fast``). Finished runs are skipped when the same command is
run again, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Solved, solve_all
from .config import Config
from .errors import PeftbenchError
from .host import Host
from .runs import RunSpec, expand
from .schema import to_dict
from .store import Store


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    busy: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def make_host(config: Config, extra_plugins: list[str] | tuple[str, ...] = ()) -> Host:
    host = Host(plugins=list(extra_plugins))
    for spec in config.plugins:
        host.load_spec(spec, source=f"{config.source}: plugins")
    for name in config.tasks:
        host.task(name)  # fail before any training on an unknown name
    for method in config.methods:
        host.method(method.name)
    return host


def run_sweep(config: Config, host: Host, store: Store, fail_fast: bool = False, progress: bool = True,
              log=print) -> SweepSummary:
    solved = solve_all(config, host)
    runs = expand(config, solved)
    summary = SweepSummary()
    log(f"peftbench: sweep {config.name!r}: {len(runs)} runs "
        f"({len(config.methods)} methods × {len(config.tasks)} tasks × {len(config.seeds)} seeds) → {store.path}")
    for i, spec in enumerate(runs, start=1):
        tag = f"[{i}/{len(runs)}] {spec.label} {spec.task} seed={spec.seed} ({spec.run_id})"
        budget = solved[(spec.label, spec.task)]
        claim = store.claim(spec.run_id, _spec_fields(spec, budget))
        if claim != "claimed":
            summary.skipped += claim == "done"
            summary.busy += claim == "busy"
            log(f"{tag}: {'finished earlier, skipped' if claim == 'done' else 'running elsewhere, skipped'}")
            continue
        try:
            result = run_one(spec, host, progress=progress)
        except KeyboardInterrupt:
            store.finish(spec.run_id, "failed", {"error": "interrupted (KeyboardInterrupt)"})
            raise
        except Exception as exc:  # record and go on: one bad run must not lose the sweep
            reason = f"{type(exc).__name__}: {exc}"
            store.finish(spec.run_id, "failed", {"error": reason, "traceback": traceback.format_exc()})
            summary.failed.append((spec, reason))
            log(f"{tag}: FAILED: {reason}")
            if fail_fast or isinstance(exc, PeftbenchError):
                # bad input fails every run the same way: stop, keeping what is stored
                if isinstance(exc, PeftbenchError):
                    raise
                break
            continue
        artifacts = save_artifacts(config, spec, result) if spec.save_adapters else None
        store.finish(spec.run_id, "done", _result_fields(result, artifacts))
        summary.done += 1
        main = host.task(spec.task).main_metric
        log(f"{tag}: best {main} {result.best.get(main, float('nan')):.4f} at step {result.best_step}, "
            f"{result.wall_s:.0f}s, {result.tokens_per_s:,.0f} tok/s, adapter {result.trainable['adapter']:,}")
    return summary


def run_one(spec: RunSpec, host: Host, progress: bool = True):
    from .trainer import train  # torch-heavy import only when training

    method = host.method(spec.method)(spec.params)
    with host.activate(method):
        return train(spec, host, method, progress=progress)


def _spec_fields(spec: RunSpec, budget: Solved) -> dict[str, Any]:
    return {
        "sweep": spec.sweep, "label": spec.label, "method": spec.method, "task": spec.task, "seed": spec.seed,
        "model": spec.model.name_or_path, "spec": spec.identity(),
        "budget": {"target": budget.target, "matched": budget.matched, "final": budget.counts.final,
                   "peak": budget.counts.peak, "nonzero": budget.counts.nonzero, "miss": budget.miss},
    }


def _result_fields(result, artifacts: str | None) -> dict[str, Any]:
    return {
        "trainable": result.trainable, "best": result.best, "final": result.final, "best_step": result.best_step,
        "history": result.history, "method_report": result.method_report, "wall_s": result.wall_s,
        "train_s": result.train_s, "tokens_per_s": result.tokens_per_s, "peak_mem_bytes": result.peak_mem_bytes,
        "mem_kind": result.mem_kind, "steps": result.steps, "artifacts": artifacts,
        "median_step_s": statistics.median(result.step_times) if result.step_times else None,
    }


def save_artifacts(config: Config, spec: RunSpec, result) -> str | None:
    """The best checkpoint's trainable weights (safetensors) and the run's spec, for export."""
    if result.best_state is None:
        return None
    from safetensors.torch import save_file

    out = Path(config.output.dir) / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, str(out / "trainable.safetensors"))
    (out / "spec.json").write_text(json.dumps({"run_id": spec.run_id, **spec.identity()}, indent=2, default=str))
    return str(out)


def print_summary(summary: SweepSummary, started: float, out=sys.stdout) -> None:
    took = time.time() - started
    print(f"peftbench: {summary.done} run(s) finished, {summary.skipped} skipped (finished earlier), "
          f"{len(summary.failed)} failed, {summary.busy} running elsewhere, in {took:.0f}s", file=out)
    for spec, reason in summary.failed:
        print(f"  failed: {spec.label} {spec.task} seed={spec.seed} ({spec.run_id}): {reason}", file=out)


__all__ = ["run_sweep", "make_host", "print_summary", "to_dict"]
