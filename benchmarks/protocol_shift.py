"""How much each bias of the old protocol moved each method: the same sweep reported four ways.

    python -m benchmarks.protocol_shift results/protocol_cpu.sqlite results/protocol_cpu_untuned.sqlite

The first store holds the tuned sweep (``configs/protocol_cpu.yaml``), the second the same sweep untuned (one
learning rate for every adapter method, the old way). For every method and task it prints the mean over seeds of
the main dev metric (×100) under:

* ``old``: untuned, best of any evaluation (over-budget ones included): what peftbench reported before;
* ``+in-budget``: untuned, best in-budget evaluation (the selection fixed, the tuning not yet);
* ``+tuned``: tuned on held-out training data, best in-budget evaluation: what peftbench reports now;
* ``tuned, any eval``: the tuned runs under the old selection (the selection bias alone, on the same runs).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from tabulate import tabulate

from peftbench.host import Host
from peftbench.store import Store
from peftbench.tuning import is_tuning_run


def means(runs: list[dict], metric: str, main: dict[str, str]) -> dict[tuple[str, str], float]:
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        name = main[run["task"]]
        if not is_tuning_run(run) and name in (run.get(metric) or {}):
            values[(run["label"], run["task"])].append(100 * run[metric][name])
    return {key: statistics.fmean(xs) for key, xs in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuned", help="store of the tuned sweep")
    parser.add_argument("untuned", help="store of the same sweep without tune:")
    args = parser.parse_args()
    with Store(args.tuned, readonly=True) as tuned_store, Store(args.untuned, readonly=True) as untuned_store:
        tuned, untuned = tuned_store.runs(), untuned_store.runs()
    host = Host()
    main_metric = {run["task"]: host.task(run["task"]).main_metric for run in tuned + untuned}
    columns = {"old": means(untuned, "best_any", main_metric), "+in-budget": means(untuned, "best", main_metric),
               "+tuned": means(tuned, "best", main_metric), "tuned, any eval": means(tuned, "best_any", main_metric)}
    keys = sorted(set().union(*columns.values()), key=lambda k: (k[1], [r["label"] for r in tuned].index(k[0])))
    rows = []
    for label, task in keys:
        row = [label, task, *(f"{columns[c][(label, task)]:.2f}" if (label, task) in columns[c] else "—"
                              for c in columns)]
        old, new = columns["old"].get((label, task)), columns["+tuned"].get((label, task))
        row.append(f"{new - old:+.2f}" if old is not None and new is not None else "—")
        rows.append(row)
    print(tabulate(rows, headers=["method", "task", *columns, "now − old"], tablefmt="github",
                   disable_numparse=True))


if __name__ == "__main__":
    main()
