"""The ``peftbench`` command line.

Bad input (config, data, plugin, budget) prints ``peftbench: error: ...`` naming the file, line or key
and exits with status 2; runs already finished stay in the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .errors import PeftbenchError

DEFAULT_CONFIG = "quickstart"
DEFAULT_DB = "results/peftbench.sqlite"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help=f"YAML config file, or the name of a packaged config (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 --set methods.lora.params.r=4")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE[:ATTR]",
                   help="load a local plugin module (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftbench", description="Budget-matched PEFT method comparisons.")
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every method × task × seed of a config (resumable)")
    _add_config_args(p)
    p.add_argument("--db", help="results store (default: the config's output.db)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="check the config and budgets, list the runs, train nothing")

    p = sub.add_parser("budget", help="solve and audit every method's trainable-parameter budget (no training)")
    _add_config_args(p)

    p = sub.add_parser("table", help="comparison table from a results store")
    p.add_argument("db", nargs="?", default=DEFAULT_DB, help=f"results store (default: {DEFAULT_DB})")
    p.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "plain"])
    p.add_argument("--method", action="append", help="only these method labels (repeatable)")
    p.add_argument("--task", action="append", help="only these tasks (repeatable)")
    p.add_argument("--model", action="append", help="only runs of these models (repeatable)")
    p.add_argument("--sweep", action="append", help="only these sweeps (repeatable)")
    p.add_argument("--final", action="store_true", help="use the final instead of the best dev metrics")

    p = sub.add_parser("plugins", help="list method and task plugins, their hooks, and failed plugins")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE[:ATTR]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "budget": cmd_budget, "table": cmd_table, "plugins": cmd_plugins}[args.command](args)
    except PeftbenchError as exc:
        print(f"peftbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peftbench: interrupted; finished runs are stored, rerun the same command to resume", file=sys.stderr)
        return 130


def _load(args):
    from .config import load_config
    from .runner import make_host

    config = load_config(args.config, args.overrides)
    return config, make_host(config, args.plugins)


def cmd_run(args) -> int:
    from .budget import BUDGET_HEADERS, budget_rows, solve_all
    from .runner import print_summary, run_sweep
    from .store import Store
    from .tables import build

    config, host = _load(args)
    if args.dry_run:
        from tabulate import tabulate

        from .runs import expand

        solved = solve_all(config, host)
        print(tabulate(budget_rows(solved), headers=BUDGET_HEADERS, tablefmt="simple", disable_numparse=True))
        for spec in expand(config, solved):
            print(f"{spec.run_id}  {spec.label:<16} {spec.task:<6} seed={spec.seed}")
        return 0
    store = Store(args.db or config.output.db)
    started = time.time()
    try:
        summary = run_sweep(config, host, store, fail_fast=args.fail_fast,
                            progress=not args.no_progress and sys.stderr.isatty() or bool(os.environ.get("PEFTBENCH_PROGRESS")))
    finally:
        rows = store.runs(sweep=[config.name])
        store.close()
    print_summary(summary, started)
    if rows:
        main_metric = {name: host.task(name).main_metric for name in {r["task"] for r in rows}}
        print()
        print(build(rows, main_metric, "plain"))
    return 0 if summary.ok else 1


def cmd_budget(args) -> int:
    from tabulate import tabulate

    from .budget import BUDGET_HEADERS, budget_rows, model_shapes, solve_all, target_count

    config, host = _load(args)
    shapes = model_shapes(config)
    target = target_count(config, shapes.targets)
    print(f"target: {target:,} adapter parameters on {len(shapes.targets)} modules "
          f"({'budget.params' if config.budget.params is not None else f'LoRA r={config.budget.lora_rank}'}); "
          f"head ({', '.join(shapes.head)}) trained by every method and counted apart; "
          f"tolerance {config.budget.tolerance:.1%}")
    solved = solve_all(config, host, shapes)
    print(tabulate(budget_rows(solved), headers=BUDGET_HEADERS, tablefmt="simple", disable_numparse=True))
    return 0


def cmd_table(args) -> int:
    from .errors import ConfigError
    from .host import Host
    from .store import Store
    from .tables import build

    if not os.path.exists(args.db):
        raise ConfigError(f"results store {args.db!r} does not exist; run `peftbench run CONFIG` first "
                          "or pass the store's path")
    store = Store(args.db)
    rows = store.runs(label=args.method, task=args.task, model=args.model, sweep=args.sweep)
    store.close()
    host = Host()
    main_metric = {}
    for name in {r["task"] for r in rows}:
        main_metric[name] = host.task(name).main_metric if name in host.tasks else None
    print(build(rows, main_metric, args.format, metric="final" if args.final else "best"))
    return 0


def cmd_plugins(args) -> int:
    from tabulate import tabulate

    from .host import Host

    host = Host(plugins=args.plugins)
    rows = []
    for name, reg in sorted(host.methods.items()):
        cls = reg.obj
        rows.append(["method", name, reg.plugin.package or reg.plugin.name, reg.plugin.version or "",
                     reg.plugin.source, ", ".join(h.removeprefix("peftbench_") for h in cls.implemented_hooks())])
    for name, reg in sorted(host.tasks.items()):
        rows.append(["task", name, reg.plugin.package or reg.plugin.name, reg.plugin.version or "",
                     reg.plugin.source, f"metric: {reg.obj.main_metric}"])
    print(tabulate(rows, headers=["kind", "name", "package", "version", "from", "hooks"], tablefmt="simple"))
    if host.failed:
        print("\nplugins that failed to load:")
        for f in host.failed:
            print(f"  {f.name} ({f.source}): {f.reason}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
