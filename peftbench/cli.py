"""The ``peftbench`` command line.

Bad input (config, data, plugin, budget) prints ``peftbench: error: ...`` naming the file, line or key
and exits with status 2; runs already finished stay in the store.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import PeftbenchError

DEFAULT_CONFIG = "quickstart"
DEFAULT_DB = "results/peftbench.sqlite"


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Options several commands take, declared once (argparse parent parsers)."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help=f"YAML config file, or the name of a packaged config (default: {DEFAULT_CONFIG})")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-3 --set methods.lora.params.r=4")
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE[:ATTR]",
                        help="also load this plugin module or path/to/file.py (repeatable): methods, tasks "
                             "(those of stored runs, for table, plot and export), observers")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", help=f"results store (default: run: the config's output.db; export: {DEFAULT_DB})")
    return {"config": config, "plugin": plugin, "db": db}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftbench", description="Budget-matched PEFT method comparisons.")
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = _shared_options()
    config, plugin, db = shared["config"], shared["plugin"], shared["db"]

    p = sub.add_parser("run", parents=[config, plugin, db],
                       help="run every method × task × seed of a config (resumable)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="check the config and budgets, list the runs, train nothing")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default): one run after another here, or on all processes of `accelerate launch` "
                        "together; ray: every run as a Ray task, this process writing the store")
    p.add_argument("--address", help="Ray cluster to join (`auto`: the one `ray start` runs on this machine; "
                                     "default: $RAY_ADDRESS, else start a local Ray instance)")
    p.add_argument("--gpus-per-run", type=float, metavar="N",
                   help="GPUs per Ray task (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-run", type=float, metavar="N", help="CPUs per Ray task (default: 1)")

    p = sub.add_parser("budget", parents=[config, plugin],
                       help="solve and audit every method's trainable-parameter budget (no training)")
    p.add_argument("--memory", type=_gpu_gb, metavar="GPU_GB",
                   help="also predict every run's peak training memory and whether it fits a GPU of this many "
                        "GiB (e.g. 24), with a hint for each run that does not")

    _add_result_commands(sub, plugin)

    p = sub.add_parser("export", parents=[plugin, db],
                       help="write a stored run's adapter (its reported checkpoint) in HF PEFT format")
    p.add_argument("run_id", help="run id (or a unique prefix), as printed by `run` and stored in the db")
    p.add_argument("out_dir", help="output folder (adapter_config.json, adapter_model.safetensors)")
    _checkpoint_option(p)
    p.add_argument("--check", action="store_true",
                   help="load the export with HF PEFT and compare its dev logits with peftbench's model")
    p.add_argument("--data-dir", help="the task's data folder for --check, for every task kind: a GLUE folder "
                   "(RTE/dev.tsv, ...), a GSM8K folder (train.jsonl, test.jsonl), ... (default: the folder the run "
                   "read, as stored with it; else $PEFTBENCH_GLUE_DIR)")

    p = sub.add_parser("evaluate", parents=[plugin, db],
                       help="evaluate a stored causal-LM run's exported adapter with lm-evaluation-harness")
    p.add_argument("run_id", help="run id (or a unique prefix)")
    p.add_argument("--harness", required=True, metavar="TASKS", help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=_positive_int, help="at most this many examples per task (a quick look; stored "
                                                        "apart from full results, as TASK@limit=N)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    _checkpoint_option(p)

    p = sub.add_parser("plugins", parents=[plugin],
                       help="list method and task plugins, their hooks, and failed plugins (a --plugin that "
                            "fails is listed, not fatal)")
    p.add_argument("--traceback", action="store_true", help="print the full traceback of every failed plugin")
    return parser


def _checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=["selected", "best", "final"], default="selected",
                   help="which weights: selected (= best, the default): the run's reported checkpoint, that of its "
                        "table columns and generations.jsonl (train.select); final: after the last step (kept only "
                        "where it differs, with output.save_adapters)")


def _add_result_commands(sub, plugin: argparse.ArgumentParser) -> None:
    """``table``, ``plot`` and ``report``: the commands that read a results store."""
    p = sub.add_parser("table", parents=[plugin], help="comparison table from a results store")
    p.add_argument("db", nargs="?", default=DEFAULT_DB, help=f"results store (default: {DEFAULT_DB})")
    p.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "plain", "json"],
                   help="json: one object per run (spec with the data fingerprint, counts, metrics, costs)")
    p.add_argument("--method", action="append", help="only these method labels (repeatable)")
    p.add_argument("--task", action="append", help="only these tasks (repeatable)")
    p.add_argument("--model", action="append", help="only runs of these models (repeatable)")
    p.add_argument("--sweep", action="append", help="only these sweeps (repeatable)")
    select = p.add_mutually_exclusive_group()
    select.add_argument("--final", action="store_true",
                        help="the final dev metrics instead of the best in-budget evaluation")
    select.add_argument("--any-eval", action="store_true",
                        help="the best of all evaluations, also those at which a method was over its budget "
                             "(the old selection, for comparison; not budget-matched)")
    p.add_argument("--baseline", default="lora", help="method label for the paired significance test (default: lora)")
    p.add_argument("--ablation", action="store_true", help="ablation mode: add a column with the params that differ")
    p.add_argument("--show", metavar="METRIC",
                   help="this stored metric instead of each task's main one, dev and test (e.g. formatted, "
                        "gold_logprob), with its own significance marks")
    p.add_argument("--tuning", action="store_true",
                   help="the tuning runs instead: one row per method × grid point, held-out metrics, chosen marked")
    p.add_argument("--cost", action=argparse.BooleanOptionalAction, default=None,
                   help="add cost columns per method: median step time, tokens/s, peak memory, training time, "
                        "adapter file size (default: in csv only; json always has every run's costs)")

    p = sub.add_parser("plot", parents=[plugin],
                       help="figures (PNG and SVG): rank allocation, rank over steps, metric vs params, curves, "
                            "Pareto fronts (metric vs params, peak memory, step time)")
    p.add_argument("db", nargs="?", default=DEFAULT_DB, help=f"results store (default: {DEFAULT_DB})")
    p.add_argument("--out-dir", default="results/plots", help="output folder (default: results/plots)")
    for flag in ("method", "task", "model", "sweep"):
        p.add_argument(f"--{flag}", action="append", help=f"only these {flag}s (repeatable)")

    p = sub.add_parser("report", parents=[plugin],
                       help="one self-contained HTML page: comparison table, costs, Pareto fronts, rank "
                            "allocations, curves, protocol and environment (no server, no network)")
    p.add_argument("db", nargs="?", default=DEFAULT_DB, help=f"results store (default: {DEFAULT_DB})")
    p.add_argument("--out", default="results/report", help="output folder for index.html (default: results/report)")
    p.add_argument("--title", default="peftbench report", help="the page's title")
    for flag in ("method", "task", "model", "sweep"):
        p.add_argument(f"--{flag}", action="append", help=f"only these {flag}s (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        commands = {"run": cmd_run, "budget": cmd_budget, "table": cmd_table, "plugins": cmd_plugins,
                    "export": cmd_export, "plot": cmd_plot, "report": cmd_report, "evaluate": cmd_evaluate}
        return commands[args.command](args)
    except PeftbenchError as exc:
        print(f"peftbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peftbench: interrupted; finished runs are stored, rerun the same command to resume", file=sys.stderr)
        return 130


def _gpu_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a GPU memory size in GiB (a positive number), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _output_folder(path: str, flag: str) -> None:
    """``path`` can be made and written as an output folder; else bad input naming ``flag``."""
    from .errors import ConfigError
    from .runner import _unwritable_dir

    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{flag} {path!r} is a file; give a folder")
    problem = _unwritable_dir(Path(path))
    if problem:
        raise ConfigError(f"{flag} {path!r}: {problem}")


def _load(args):
    from .config import load_config
    from .runner import make_host

    config = load_config(args.config, args.overrides)
    return config, make_host(config, args.plugins)


def _quiet(*args, **kwargs) -> None:
    pass


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # SIGTERM (e.g. a cluster's time limit): stop as on Ctrl-C


def _executor(args):
    """The executor ``run`` asked for; the distributed one when started by ``accelerate launch`` on several
    processes."""
    from .errors import ConfigError
    from .executors import DistributedExecutor, LocalExecutor, RayExecutor, launched_processes

    progress = not args.no_progress and sys.stderr.isatty() or bool(os.environ.get("PEFTBENCH_PROGRESS"))
    ray_flags = [flag for flag, value in (("--address", args.address), ("--gpus-per-run", args.gpus_per_run),
                                          ("--cpus-per-run", args.cpus_per_run)) if value is not None]
    if args.executor != "ray" and ray_flags:
        raise ConfigError(f"{', '.join(ray_flags)} only apply to --executor ray")
    if launched_processes() > 1:
        if args.executor == "ray":
            raise ConfigError("--executor ray runs each run as a Ray task; start it with `peftbench run`, "
                              "not under `accelerate launch` / torchrun")
        return DistributedExecutor(progress=progress)
    if args.executor == "ray":
        return RayExecutor(args.address, args.gpus_per_run, 1 if args.cpus_per_run is None else args.cpus_per_run)
    return LocalExecutor(progress=progress)


def cmd_run(args) -> int:
    from .executors import is_main_process
    from .runner import print_summary, resolve, run_sweep
    from .store import Store
    from .sweep import SweepSummary
    from .tables import build

    executor = _executor(args)
    config, host = _load(args)
    resolved = resolve(config, host, db=args.db)  # bad input fails here, before the store is created
    if args.dry_run:
        _print_dry_run(config, resolved)
        return 0
    # under `accelerate launch`, the main process alone writes the store and reports; the others train along
    main_process = is_main_process()
    store = Store(args.db or config.output.db) if main_process else None
    started = time.time()
    summary = SweepSummary()
    rows = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if on_main_thread else None
    try:
        run_sweep(config, host, store, fail_fast=args.fail_fast, summary=summary, executor=executor,
                  log=print if main_process else _quiet, resolved=resolved)
    except PeftbenchError as exc:
        if main_process:
            raise
        return exc.exit_code  # the main process prints the error
    finally:  # also when stopped by bad input or an interrupt: say what was done and stored
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if main_process:
            rows = store.runs(sweep=[config.name])
            summary.abandoned = store.abandoned(summary.busy_ids)  # their process died after we skipped them
            store.close()
            print_summary(summary, started)
    if rows:
        print()
        main_metric = main_metrics(rows, host)
        print(build(rows, main_metric, "plain", tie_break=tie_breaks(main_metric, host)))
    return 0 if summary.ok else 1


def _print_dry_run(config, resolved) -> None:
    """The budgets and the ids the runs will use (with ``tune:``, the tuning runs'; the final runs' ids depend
    on the choice)."""
    from tabulate import tabulate

    from .budget import BUDGET_HEADERS, budget_rows
    from .runs import expand
    from .tuning import point_text

    print(tabulate(budget_rows(resolved.solved), headers=BUDGET_HEADERS, tablefmt="simple", disable_numparse=True))
    if config.tune is not None:
        print(f"phase 1, tuning on {100 * config.tune.holdout:g}% of the training set held out:")
        for spec in resolved.runs:
            print(f"{spec.run_id}  {spec.label:<16} {spec.task:<6} seed={spec.seed} {point_text(spec.tuning['point'])}")
        print("phase 2, at each method's chosen point per task, on the full training set:")
    for spec in resolved.runs if config.tune is None else expand(config, resolved.solved, resolved.data):
        run_id = "(after tuning)  " if config.tune is not None else spec.run_id
        print(f"{run_id}  {spec.label:<16} {spec.task:<6} seed={spec.seed}")


def cmd_budget(args) -> int:
    from tabulate import tabulate

    from .budget import BUDGET_HEADERS, budget_rows, model_shapes, target_count
    from .runner import solve_budgets
    from .task import GenerationTask

    config, host = _load(args)
    shapes = model_shapes(config, host)
    target = target_count(config, shapes.targets)
    print(f"target: {target:,} adapter parameters on {len(shapes.targets)} modules "
          f"({'budget.params' if config.budget.params is not None else f'LoRA r={config.budget.lora_rank}'}); "
          f"head ({', '.join(shapes.head)}) trained by every method and counted apart; "
          f"tolerance {config.budget.tolerance:.1%}")
    solved = solve_budgets(config, host, shapes)
    print(tabulate(budget_rows(solved), headers=BUDGET_HEADERS, tablefmt="simple", disable_numparse=True))
    _in_budget_plan(config, host, solved)
    if args.memory is not None and isinstance(host.task(config.tasks[0]), GenerationTask):
        print("\nnote: --memory models encoder classifiers (peftbench/memory.py); no prediction for decoder LLMs yet")
    elif args.memory is not None and config.model.dtype != "fp32":
        print(f"\nnote: --memory models fp32 weights (peftbench/memory.py); no prediction for model.dtype: "
              f"{config.model.dtype} yet")
    elif args.memory is not None:
        _memory_plan(config, host, shapes, solved, args.memory)
    return 0


def _in_budget_plan(config, host, solved) -> None:
    """Which dev evaluations count toward each method's reported metric (those at which it is within budget)."""
    from tabulate import tabulate

    from .config import data_dir_for
    from .sweep import in_budget_plans

    sizes, missing, assumed = {}, [], []
    for task in config.tasks:
        try:
            sizes[task] = len(host.task(task).load("train", data_dir_for(config)).labels)
        except Exception:  # no data here: the number of steps is unknown, unless max_steps caps every run
            trains = [config.train_for(m, task) for m in config.methods]
            if all(t.max_steps for t in trains):  # assume one epoch at least covers max_steps
                sizes[task] = max(t.max_steps * t.batch_size * t.grad_accum for t in trains)
                assumed.append(f"{task} (at least {sizes[task]:,} examples assumed: train.max_steps caps every run)")
            else:
                missing.append(task)
    plans = in_budget_plans(config, host, solved, sizes)
    print(f"\nin-budget evaluations: only evaluations at which a method is within its budget can be the checkpoint "
          f"that is reported (the final one always can); fewer in budget than the smaller of budget.min_evaluations "
          f"= {config.budget.min_evaluations} and the run's number of evaluations is a config error")
    if missing:
        print(f"note: no training data for {', '.join(missing)}: their steps are unknown here")
    if assumed:
        print(f"note: no training data for {', '.join(assumed)}")
    rows = [[label, task, f"{p.total_steps:,}", f"{p.from_step:,}", f"{p.counted} of {len(p.evaluations)}",
             *_rates(config, label, task)] for (label, task), p in plans.items()]
    print(tabulate(rows, headers=["method", "task", "steps", "in budget from step", "evaluations counted", "lr",
                                  "head lr"], tablefmt="simple", disable_numparse=True))
    print(f"checkpoint: {_SELECT_RULES[config.train.select]}; head lr: the same rule for every method (the sweep's "
          "train.lr unless train.head_lr is set; a grid's train.lr does not move it)")


_SELECT_RULES = {
    "validation": "the best in-budget evaluation on a validation split held out of the training data "
                  "(train.validation_size), dev scored once at it",
    "final": "the final model, dev scored once",
    "dev": "the best of the dev evaluations (reproduces papers; not a fair protocol)",
}


def _rates(config, label: str, task: str) -> list[str]:
    """The adapter's and the head's learning rate of (label, task), or ``tuned`` where its grid sets it."""
    method = next(m for m in config.methods if m.label == label)
    train, grid = config.train_for(method, task), config.grid_for(method)
    return [f"tuned ({len(grid[key])} values)" if key in grid else f"{getattr(train, key[6:]):g}"
            for key in ("train.lr", "train.head_lr")]


def _memory_plan(config, host, shapes, solved, gpu_gb: float) -> None:
    from tabulate import tabulate

    from .memory import MEMORY_HEADERS, longest_batches, plan

    longest, notes = longest_batches(config, host, config.tasks)
    rows = plan(config, solved, shapes, longest, gpu_gb)
    auto = any(config.train_for(m, t).precision == "auto" for m in config.methods for t in config.tasks)
    print(f"\npredicted peak training memory on a {gpu_gb:g} GiB GPU (weights, gradients, AdamW state and "
          f"activations at the longest batch; {'precision auto taken as bf16; ' if auto else ''}see "
          "peftbench/memory.py)")
    for note in notes:
        print(f"note: {note}")
    print(tabulate(rows, headers=MEMORY_HEADERS, tablefmt="simple", disable_numparse=True))
    misses = sum(row[6] == "NO" for row in rows)
    if misses:
        print(f"peftbench: warning: {misses} of {len(rows)} runs will not fit {gpu_gb:g} GiB", file=sys.stderr)


def cmd_table(args) -> int:
    from .host import Host
    from .tables import build

    rows = _stored_runs(args)
    host = Host(plugins=args.plugins)
    main_metric = main_metrics(rows, host)
    metric = "final" if args.final else "best_any" if args.any_eval else "best"
    text = build(rows, main_metric, args.format, metric=metric, baseline=args.baseline,
                 ablation=args.ablation, tuning=args.tuning, cost=args.cost, tie_break=tie_breaks(main_metric, host),
                 show=args.show)
    # a store written by an older peftbench may hold control characters in names: shown escaped, never raw
    print(re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", lambda m: repr(m[0])[1:-1], text))
    if args.format in ("markdown", "plain") and any(r.get("harness") for r in rows):
        from tabulate import tabulate

        from .harness import harness_columns

        headers, table = harness_columns(rows)
        print("\nlm-evaluation-harness (`peftbench evaluate --harness`), per run, at its reported checkpoint "
              "(TASK@final: after the last step):")
        print(tabulate(table, headers=headers, tablefmt="github" if args.format == "markdown" else "simple",
                       disable_numparse=True))
    return 0


def main_metrics(rows, host) -> dict[str, str]:
    """Each stored task's main metric, from its plugin (or, without it, the runs' only metric), in the order
    the task plugins register their tasks (the table's column order), tasks of no loaded plugin last."""
    stored = {r["task"] for r in rows}
    main_metric = {name: host.task(name).main_metric for name in host.tasks if name in stored}
    for name in sorted(stored - set(host.tasks)):
        keys = {k for r in rows if r["task"] == name for k in (r.get("best") or {})}
        if len(keys) == 1:
            main_metric[name] = keys.pop()
        else:
            print(f"peftbench: skipping task {name!r}: its plugin is not loaded (use --plugin)", file=sys.stderr)
    return main_metric


def tie_breaks(main_metric: dict[str, str], host) -> dict[str, tuple[str, ...]]:
    """Each task's tie-break metrics (:attr:`peftbench.task.Task.tie_break`), as the tuning's choice used them;
    none for a task of no loaded plugin."""
    return {name: host.task(name).tie_break for name in main_metric if name in host.tasks}


def _stored_runs(args, status: str | None = "done"):
    from .errors import ConfigError
    from .store import Store

    if not os.path.exists(args.db):
        raise ConfigError(f"results store {args.db!r} does not exist; run `peftbench run CONFIG` first "
                          "or pass the store's path")
    store = Store(args.db, readonly=True)  # a reader never changes the file
    rows = store.runs(status, label=args.method, task=args.task, model=args.model, sweep=args.sweep)
    store.close()
    return rows


def cmd_plot(args) -> int:
    from .errors import ConfigError
    from .host import Host
    from .plots import plot_all
    from .tuning import current_choices, is_tuning_run

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("peftbench plot needs matplotlib: pip install 'peftbench[plot]'") from None
    stored = _stored_runs(args)
    host = Host(plugins=args.plugins)
    metrics = main_metrics(stored, host)
    rows = [row for row in current_choices(stored, metrics, tie_breaks(metrics, host)) if not is_tuning_run(row)]
    _output_folder(args.out_dir, "--out-dir")
    try:
        written = plot_all(rows, metrics, args.out_dir)
    except OSError as exc:
        raise ConfigError(f"--out-dir {args.out_dir!r}: cannot write the figures ({exc})") from None
    print(f"peftbench: wrote {len(written)} file(s) to {args.out_dir}" + "".join(f"\n  {p}" for p in written))
    return 0


def cmd_report(args) -> int:
    from .errors import ConfigError
    from .host import Host
    from .report import write_report

    stored = _stored_runs(args, status=None)  # also the unfinished runs: the page lists them as such
    rows = [row for row in stored if row["status"] == "done"]
    _output_folder(args.out, "--out")
    try:
        host = Host(plugins=args.plugins)
        main_metric = main_metrics(rows, host)
        page = write_report(rows, main_metric, args.out,
                            unfinished=[row for row in stored if row["status"] != "done"], source=args.db,
                            title=args.title, tie_break=tie_breaks(main_metric, host))
    except OSError as exc:
        raise ConfigError(f"--out {args.out!r}: cannot write the report ({exc})") from None
    print(f"peftbench: wrote {page} ({len(rows)} finished run(s))")
    return 0


def cmd_export(args) -> int:
    from .errors import ConfigError, DataError
    from .export import export_run, run_host
    from .store import Store

    db = args.db or DEFAULT_DB
    if not os.path.exists(db):
        raise ConfigError(f"results store {db!r} does not exist")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"export destination {args.out_dir!r} is an existing file; give a folder")
    store = Store(db, readonly=True)
    run = store.get(args.run_id)
    store.close()
    if run is None or run["status"] != "done":
        raise ConfigError(f"{db}: no finished run with id {args.run_id!r} (ids are listed by `peftbench run`)")
    if args.check and run["method"] != "full":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("--check loads the export with HF PEFT, which is not installed here: pip install peft "
                              "(or pip install -e '.[dev]')") from None
    host = run_host(run, args.plugins)
    out = export_run(run, args.out_dir, host, args.checkpoint)
    what = "the trained model (full fine-tuning: config.json, model.safetensors)" if run["method"] == "full" \
        else "the adapter"
    print(f"peftbench: exported {what} of run {run['run_id']} ({run['label']}, {run['task']}, seed {run['seed']}) "
          f"at {checkpoint_text(run, args.checkpoint)} to {out}")
    if args.check:
        data_dir = args.data_dir or run["spec"].get("data_dir") or os.environ.get("PEFTBENCH_GLUE_DIR")
        try:
            diff, agree = check_export(run, out, host, data_dir, args.checkpoint)
        except (ConfigError, DataError) as exc:
            if args.data_dir:
                raise
            where = f" (the run read it from {data_dir})" if data_dir else ""
            raise type(exc)(f"{exc}\n--check reads the run's dev data{where}: give its folder with --data-dir "
                            "FOLDER") from None
        print(f"peftbench: {'transformers' if run['method'] == 'full' else 'HF PEFT'} reload: max |Δlogit| {diff:.2e}, dev predictions agree on {agree:.2%}")
    return 0


def cmd_evaluate(args) -> int:
    from .errors import ConfigError
    from .export import run_host
    from .harness import evaluate_run
    from .store import Store

    db = args.db or DEFAULT_DB
    if not os.path.exists(db):
        raise ConfigError(f"results store {db!r} does not exist")
    with Store(db, readonly=True) as store:
        run = store.get(args.run_id)
    if run is None or run["status"] != "done":
        raise ConfigError(f"{db}: no finished run with id {args.run_id!r}")
    results = evaluate_run(run, run_host(run, args.plugins), args.harness.split(","), args.limit, args.include_path,
                           args.batch_size, args.device, checkpoint=args.checkpoint)
    if args.limit is not None:  # a quick look on part of a task never replaces its full result
        results = {f"{task}@limit={args.limit}": metrics for task, metrics in results.items()}
    if args.checkpoint == "final":  # nor does another checkpoint's result replace the reported one's
        results = {f"{task}@final": metrics for task, metrics in results.items()}
    print(f"peftbench: lm-evaluation-harness on run {run['run_id']} at {checkpoint_text(run, args.checkpoint)}")
    with Store(db) as store:
        store.set_harness(run["run_id"], results)
    for task, entry in results.items():
        print(f"{task} ({entry['samples']} documents): "
              + ", ".join(f"{k} {v:.4f}" for k, v in entry["metrics"].items() if "stderr" not in k))
    return 0


def checkpoint_text(run, checkpoint: str) -> str:
    """``the selected checkpoint (step 12 of 20, train.select: validation; the reported one)``."""
    from .export import checkpoint_info

    info = checkpoint_info(run, checkpoint)
    reported = "the reported one" if info["reported"] else f"not the reported one, step {run.get('best_step')}'s"
    return (f"the {info['checkpoint']} checkpoint (step {info['step']} of {info['steps']}, train.select: "
            f"{info['select']}; {reported})")


def check_export(run, out, host, data_dir: str | None, checkpoint: str = "selected") -> tuple[float, float]:
    """Max logit difference and prediction agreement between peftbench's model and the PEFT reload."""
    import torch

    from .config import ModelConfig, TrainConfig
    from .export import load_with_peft, rebuild
    from .modeling import load_tokenizer
    from .schema import from_dict

    spec = run["spec"]
    ours = rebuild(run, host, checkpoint=checkpoint)[0]
    theirs = load_with_peft(run, out, host)
    task = host.task(spec["task"]).with_options(spec.get("task_options"))
    train = from_dict(TrainConfig, spec["train"], "spec.train")
    tokenizer = load_tokenizer(from_dict(ModelConfig, spec["model"], "spec.model"))
    loader = task.check_loader(task.dev_splits[0], data_dir or spec.get("data_dir"), tokenizer, train)
    diff, same, total = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            a, b = ours(**inputs).logits, theirs(**inputs).logits
            if a.ndim == 3:  # a causal LM: the next token after each (left-padded) prompt
                a, b = a[:, -1], b[:, -1]
            diff = max(diff, float((a - b).abs().max()))
            if not task.is_regression:
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
            else:
                same += int(torch.isclose(a, b, atol=1e-4).sum())
            total += len(a)
    return diff, same / max(total, 1)


def cmd_plugins(args) -> int:
    from tabulate import tabulate

    from .hookspecs import API_VERSION
    from .host import Host

    host = Host(plugins=args.plugins, strict=False)  # a broken plugin is listed below, never fatal here
    print(f"peftbench {__version__}, hook API version {API_VERSION}\n")
    rows = []
    for name, reg in sorted(host.methods.items()):
        cls = reg.obj
        rows.append(["method", name, reg.plugin.package or reg.plugin.name, reg.plugin.version or "",
                     reg.plugin.source, ", ".join(h.removeprefix("peftbench_") for h in cls.implemented_hooks())])
    for name, reg in sorted(host.tasks.items()):
        rows.append(["task", name, reg.plugin.package or reg.plugin.name, reg.plugin.version or "",
                     reg.plugin.source, f"metric: {reg.obj.main_metric}"])
    contributors = {id(reg.plugin) for reg in [*host.methods.values(), *host.tasks.values()]}
    for info in host.plugins:  # loaded plugins that add no method or task (observers of every run, or empty)
        run_hooks = [h.removeprefix("peftbench_") for h in info.hooks if h not in ("peftbench_add_methods",
                                                                                   "peftbench_add_tasks")]
        if id(info) not in contributors:
            rows.append(["observer" if run_hooks else "plugin", info.name, info.package or info.name,
                         info.version or "", info.source, ", ".join(run_hooks) or "(adds nothing)"])
    print(tabulate(rows, headers=["kind", "name", "package", "version", "from", "hooks"], tablefmt="simple"))
    if host.failed:
        print(f"\nplugins that failed to load ({len(host.failed)}; the others work normally):")
        for f in host.failed:
            print(f"  {f.name} ({f.source}): {f.reason}")
            if args.traceback and f.traceback:
                print("    " + f.traceback.rstrip().replace("\n", "\n    "))
        if not args.traceback and any(f.traceback for f in host.failed):
            print("(add --traceback for the full tracebacks)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
