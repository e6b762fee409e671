"""Each method's step time against LoRA's, from a finished sweep's store (the final runs of every task and seed):
the median over runs of each run's median optimizer-step time, its ratio to the baseline's, training tokens/s,
and the measured final adapter count with its audit. The runs of one sweep share the machine's conditions (with
``--executor ray --cpus-per-run 1``: two runs at a time, one thread each), so the ratios compare like with like.

    python -m benchmarks.zoo_costs results/peft_zoo.sqlite [--baseline lora]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from tabulate import tabulate

from peftbench.cli import main_metrics
from peftbench.host import Host
from peftbench.store import Store
from peftbench.tuning import current_choices, is_tuning_run


def rows(runs: list[dict], baseline: str) -> list[list]:
    by_label: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_label[run["label"]].append(run)
    if baseline not in by_label:
        raise SystemExit(f"no finished final runs of the baseline {baseline!r} in the store")
    base = statistics.median(r["median_step_s"] for r in by_label[baseline])
    table = []
    for label, group in by_label.items():
        step = statistics.median(r["median_step_s"] for r in group)
        audits = [r.get("audit") or {} for r in group]
        finals = sorted({a.get("final") for a in audits if a.get("final") is not None})
        count = f"{finals[0]:,}" if len(finals) == 1 else f"{finals[0]:,}–{finals[-1]:,}" if finals else "?"
        if any(a.get("reference") for a in audits):
            audit = "reference"
        else:
            audit = "ok" if all(a.get("ok") for a in audits) else "MISS"
        table.append([label, count, audit, len(group), f"{1e3 * step:.1f}", f"{step / base:.2f}x",
                      f"{statistics.median(r['tokens_per_s'] for r in group):,.0f}"])
    return sorted(table, key=lambda row: float(row[5][:-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("--baseline", default="lora")
    args = parser.parse_args(argv)
    with Store(args.db, readonly=True) as store:
        stored = store.runs()
    host = Host(plugins=sorted({p for r in stored for p in (r.get("spec") or {}).get("plugins") or ()}))
    runs = [r for r in current_choices(stored, main_metrics(stored, host)) if not is_tuning_run(r)]
    print(tabulate(rows(runs, args.baseline),
                   headers=["method", "final count", "audit", "runs", "step ms (median)", f"vs {args.baseline}",
                            "tok/s"], tablefmt="github"))


if __name__ == "__main__":
    main()
