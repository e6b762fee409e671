"""Where a sweep's runs train: here, one after another; on every process of ``accelerate launch``; or as Ray
tasks on a cluster.

Every executor drives the same :class:`peftbench.sweep.Sweep` bookkeeping (data check, claims, failures,
artifacts, log lines, summary), so budgets, resume, ``--fail-fast`` and the exit statuses mean the same
everywhere. What differs is only where :func:`peftbench.sweep.train_outcome` runs:

* :class:`LocalExecutor` (``--executor local``, the default): in this process. Never imports Ray.
* :class:`DistributedExecutor` (chosen by the CLI when started by ``accelerate launch`` / ``torchrun`` with
  several processes): every process trains every run together, data-parallel (DDP) through the trainer's
  ``Accelerator``. All processes compute the same run list; the main process alone checks the data, claims
  runs, writes the store, the artifacts and the log, and broadcasts each decision, so that all processes run
  the same runs in the same order. After each run the processes exchange their outcomes and agree on one.
  Each batch is split between the processes, so a run's result does not depend on their number.
* :class:`RayExecutor` (``--executor ray``): each claimed run becomes a Ray task (one GPU each when the
  cluster has GPUs). A task gets the run as plain data plus the plugin specs, builds the same plugin host,
  trains, and returns the result fields and the best trainable weights as safetensors bytes; it never opens
  the store. The driver writes the store and the artifacts as results stream back (``ray.wait``), so the
  nodes need no shared file system. A run whose worker process dies (killed for memory, a crash, a lost
  node) is started again once (:data:`WORKER_RETRIES`), then stored as failed. Ctrl-C (or SIGTERM) cancels
  the outstanding tasks and stores their runs as interrupted, and a driver killed outright leaves its runs
  ``running`` under its dead pid: either way rerunning the command redoes exactly those.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

from .errors import ConfigError, PeftbenchError
from .host import Host
from .runs import IDENTITY_CONSTANTS, RunSpec
from .schema import from_dict
from .sweep import Outcome, Sweep, failure_reason, train_outcome

#: environment variables that launchers set to the number of processes and to this process' rank
#: (torchrun and ``accelerate launch``; the MPI launchers)
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launched_processes() -> int:
    """How many processes a launcher (``accelerate launch``, ``torchrun``, MPI) started for this command."""
    return _env_int(_SIZE_VARS, 1)


def is_main_process() -> bool:
    return _env_int(_RANK_VARS, 0) == 0


def rebuild_error(type_name: str, message: str) -> PeftbenchError:
    """A bad-input error that happened in another process, as its own class where peftbench has it."""
    from . import errors

    cls = getattr(errors, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PeftbenchError)):
        cls = PeftbenchError
    return cls(message)


# -- here -------------------------------------------------------------------------------------------------


class LocalExecutor:
    """One run after another in this process."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def run(self, sweep: Sweep, fail_fast: bool = False) -> None:
        sweep.check()
        for i, spec in enumerate(sweep.runs, start=1):
            tag = sweep.claim(i, spec)
            if tag is None:
                continue
            checkpoint = sweep.checkpoint(spec, tag)
            try:
                outcome = train_outcome(spec, sweep.host, progress=self.progress, checkpoint=checkpoint)
                finished = sweep.record(spec, tag, outcome, checkpoint)
            except KeyboardInterrupt:
                sweep.stopped(spec)  # a no-op when the run was stored just before
                raise
            if not finished and fail_fast:
                break


# -- all processes of accelerate launch -------------------------------------------------------------------


class DistributedExecutor:
    """Every run on all processes of ``accelerate launch`` (DDP); the main process keeps the books.

    The processes run in step: a run that fails on some of them only (out of memory on one GPU) leaves the
    others waiting in a collective until its timeout, after which they fail too. Methods that replace
    parameters during training fail their run with the reason when there are several processes (PrunedLoRA
    checks this in its ``peftbench_train_start``): DistributedDataParallel cannot follow new parameters.
    """

    def __init__(self, progress: bool = True):
        self.progress = progress

    def run(self, sweep: Sweep, fail_fast: bool = False) -> None:
        state = distributed_state(sweep.config)
        main = state.is_main_process
        check_batch_sizes(sweep, state.num_processes)  # the same on every process: no need to broadcast
        _on_main(state, sweep.check)
        if main:
            sweep.log(f"peftbench: {state.num_processes} processes ({state.distributed_type.value}) train each "
                      "run together; this one keeps the store")
        for i, spec in enumerate(sweep.runs, start=1):
            tag = _on_main(state, lambda i=i, spec=spec: sweep.claim(i, spec))
            if tag is None:
                continue
            checkpoint = sweep.checkpoint(spec, tag, quiet=not main)  # every process restores, the main saves
            try:
                outcome = _agree(state, train_outcome(spec, sweep.host, progress=self.progress and main,
                                                      checkpoint=checkpoint))
                finished = sweep.record(spec, tag, outcome, checkpoint) if main else _follow(sweep, spec, outcome)
            except KeyboardInterrupt:
                if main:
                    sweep.stopped(spec)
                raise
            if not finished and fail_fast:
                break


    def on_main(self, config, decide):
        """``decide()`` on the main process (it holds the store), its result on every process."""
        return _on_main(distributed_state(config), decide)


def distributed_state(config):
    """accelerate's process state (initialises the process group once; the trainer's ``Accelerator`` reuses
    it), on CPU (gloo) when the config trains on the CPU or there is no GPU."""
    import torch
    from accelerate import PartialState

    use_cpu = (config.train.device == "cpu" or not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    return PartialState(cpu=use_cpu)


def check_batch_sizes(sweep: Sweep, processes: int) -> None:
    """Every batch is split between the processes (:func:`peftbench.trainer.train`), so the batch sizes of every
    run must be multiples of their number."""
    for spec in sweep.runs:
        for key in ("batch_size", "eval_batch_size"):
            size = getattr(spec.train, key)
            if size % processes:
                raise ConfigError(f"{sweep.config.source}: train.{key} is {size} for {spec.label} on {spec.task}, "
                                  f"not a multiple of the {processes} processes that split each batch")


def _on_main(state, decide):
    """``decide()`` on the main process, its result (or its bad-input error) on every process: all of them
    take the same branch, and none waits forever for a main process that stopped."""
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error = None
    if state.is_main_process:
        try:
            box[0] = ("value", decide())
        except PeftbenchError as exc:
            error, box[0] = exc, ("error", type(exc).__name__, str(exc))
        except BaseException as exc:  # interrupted or crashed: the others stop as well
            error, box[0] = exc, ("stop", f"{type(exc).__name__}: {exc}")
    broadcast_object_list(box, from_process=0)
    kind, *rest = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise rebuild_error(*rest)
    if kind == "stop":
        raise RuntimeError(f"the main process stopped: {rest[0]}")
    return rest[0]


def _agree(state, outcome: Outcome) -> Outcome:
    """Every process' outcome of the run, made one: a failure on any process fails the run everywhere (bad
    input first, then the lowest rank's failure), so all processes go on, or stop, together."""
    from accelerate.utils import gather_object

    error = None if outcome.error is None else (type(outcome.error).__name__, str(outcome.error))
    everyone = gather_object([(outcome.reason, outcome.traceback, error)])
    failures = [(rank, report) for rank, report in enumerate(everyone) if report[0] is not None]
    if not failures:
        return outcome
    rank, (reason, tb, error) = min(failures, key=lambda f: (f[1][2] is None, f[0]))
    if rank == state.process_index:
        return outcome
    return Outcome(reason=f"{reason} (on process {rank})", traceback=tb,
                   error=None if error is None else rebuild_error(*error))


def _follow(sweep: Sweep, spec: RunSpec, outcome: Outcome) -> bool:
    """A non-main process' share of :meth:`Sweep.record`: the same summary and the same stop, no store."""
    if outcome.error is not None:
        raise outcome.error
    if outcome.ok:
        sweep.summary.done += 1
    else:
        sweep.summary.failed.append((spec, outcome.reason))
    return outcome.ok


# -- Ray --------------------------------------------------------------------------------------------------

#: how many times a run whose Ray worker process died (killed by the kernel's OOM killer or Ray's memory
#: monitor, a crash, its node lost) is started again (from its checkpoint with ``output.checkpoint``, where the
#: new task lands on the same node). Once: a lost node is survived, while a crash that repeats costs one more
#: run, not Ray's default of three more; rerunning the command redoes a run that failed so.
WORKER_RETRIES = 1


class RayExecutor:
    """Each claimed run as a Ray task; results stream back to this process, which alone writes the store.

    ``address``: the cluster to join (``"auto"``: the one ``ray start`` runs on this machine); ``None`` joins
    the cluster this process is already connected to or that ``RAY_ADDRESS`` names, else starts a local
    instance. ``gpus_per_run``: GPUs per task (default 1 when the cluster has GPUs, else 0);
    ``cpus_per_run``: CPUs per task. Workers build their plugin host from the installed entry points and the
    sweep host's other plugin specs (``--plugin`` and ``config.plugins``), so those must be importable on
    every node (file paths are made absolute); the model and the data must be at the same paths on every
    node (or come from the hub).
    """

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: float = 1):
        for flag, value in (("--gpus-per-run", gpus_per_run), ("--cpus-per-run", cpus_per_run)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag}: must be 0 or more, got {value}")
        self.address, self.gpus_per_run, self.cpus_per_run = address, gpus_per_run, cpus_per_run

    def run(self, sweep: Sweep, fail_fast: bool = False) -> None:
        ray = import_ray()
        sweep.check()  # bad data stops the sweep before Ray starts
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address)
        try:
            self._run(ray, sweep, fail_fast)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, sweep: Sweep, fail_fast: bool) -> None:
        resources = ray.cluster_resources()
        gpus = self.gpus_per_run if self.gpus_per_run is not None else (1 if resources.get("GPU") else 0)
        sweep.log(f"peftbench: Ray executor: each run a task with {self.cpus_per_run:g} CPU(s), {gpus:g} GPU(s); "
                  f"cluster: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        if not any(node["Alive"] and node["Resources"].get("CPU", 0) >= self.cpus_per_run
                   and node["Resources"].get("GPU", 0) >= gpus for node in ray.nodes()):
            sweep.log(f"peftbench: warning: no node of the Ray cluster has the {self.cpus_per_run:g} CPU(s) and "
                      f"{gpus:g} GPU(s) of one task; the runs wait until such a node joins")
        task = ray.remote(train_on_worker)
        plugins = worker_plugins(sweep.host)
        in_flight: dict[Any, tuple[RunSpec, str, dict, int]] = {}  # a task: its run, log tag, payload, attempt

        def submit(spec: RunSpec, tag: str, payload: dict, attempt: int) -> None:
            # max_retries=0: a task whose worker died is started again below, where the log can say so
            ref = task.options(num_cpus=self.cpus_per_run, num_gpus=gpus, max_retries=0,
                               name=f"peftbench {spec.label} {spec.task} seed={spec.seed}").remote(payload)
            in_flight[ref] = (spec, tag, payload, attempt)

        try:
            for i, spec in enumerate(sweep.runs, start=1):
                tag = sweep.claim(i, spec)
                if tag is None:
                    continue
                checkpoint = sweep.checkpoint(spec, tag)
                submit(spec, tag, {"run_id": spec.run_id, "spec": spec_payload(spec), "plugins": plugins,
                                   "checkpoint": str(checkpoint.path.resolve()) if checkpoint else None}, 1)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)  # timeout: Ctrl-C gets through
                if not ready:
                    continue
                spec, tag, payload, attempt = in_flight.pop(ready[0])
                outcome, died = self._fetch(ray, ready[0], tag, sweep.log)
                if died and attempt <= WORKER_RETRIES:  # killed, crashed or its node lost: once more (from its checkpoint)
                    sweep.log(f"{tag}: {outcome.reason}; starting the run again (attempt {attempt + 1} of "
                              f"{1 + WORKER_RETRIES})")
                    submit(spec, tag, payload, attempt + 1)
                    continue
                if died and attempt > 1:
                    outcome.reason += f" (started {attempt} times: its worker process died each time)"
                if not sweep.record(spec, tag, outcome) and fail_fast:
                    _cancel(ray, in_flight, sweep, "cancelled: --fail-fast stopped the sweep after a failed run")
        except PeftbenchError:
            _cancel(ray, in_flight, sweep, "cancelled: the sweep stopped on bad input")
            raise
        except BaseException:  # Ctrl-C, SIGTERM, or the driver itself failing
            _cancel(ray, in_flight, sweep, "interrupted")
            raise

    @staticmethod
    def _fetch(ray, ref, tag: str, log) -> tuple[Outcome, bool]:
        """The task's outcome, and whether its worker process died (rather than the run failing in it)."""
        try:
            payload = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died: killed for memory, node lost, cancelled
            text = str(exc).strip()
            reason = f"the Ray task failed: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if isinstance(exc, ray.exceptions.OutOfMemoryError):
                reason += ("; lower train.batch_size or train.max_length, or run fewer runs per node "
                           "(a larger --cpus-per-run)")
            died = isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                                    ray.exceptions.OutOfMemoryError))
            return Outcome(reason=reason, traceback=text), died
        for message in payload["log"]:
            log(f"{tag}: {message} (on {payload['host']})")
        error = payload["error"]
        return Outcome(fields=payload["fields"], weights=payload["weights"],
                       final_weights=payload.get("final_weights"), reason=payload["reason"],
                       traceback=payload["traceback"], error=None if error is None else rebuild_error(*error)), False


def _cancel(ray, in_flight: dict, sweep: Sweep, reason: str) -> None:
    """Cancel the outstanding tasks and store their runs as failed with ``reason``: rerunning redoes them."""
    for ref, (spec, tag, *_) in in_flight.items():
        try:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: its worker process (torch imported) stays for reuse
        except Exception:  # finished meanwhile, or Ray is shutting down: the run is still redone
            pass
        sweep.stopped(spec, reason, tb=f"{reason} (on the driver)")
        sweep.log(f"{tag}: {reason}")
    in_flight.clear()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'peftbench[ray]'") from None
    return ray


def worker_plugins(host: Host) -> list[str]:
    """The plugin specs a worker loads to build the same host (:meth:`Host.plugin_specs`)."""
    return host.plugin_specs()


def spec_payload(spec: RunSpec) -> dict[str, Any]:
    """A run as plain data: its identity (params, model and train settings as dicts) and where its data is
    and its artifacts go. No plugin classes travel: the worker rebuilds them from its own plugins."""
    return {**spec.identity(), "sweep": spec.sweep, "save_adapters": spec.save_adapters,
            "data_dir": os.path.abspath(spec.data_dir) if spec.data_dir else None,
            "trackers": list(spec.trackers), "out_dir": os.path.abspath(spec.out_dir) if spec.out_dir else None}


def rebuild_spec(data: dict[str, Any], host: Host) -> RunSpec:
    from .config import ModelConfig, TrainConfig

    data = {k: v for k, v in data.items() if k not in IDENTITY_CONSTANTS}
    return RunSpec(**{**data, "params": from_dict(host.method(data["method"]).Params, data["params"], "spec.params"),
                      "model": from_dict(ModelConfig, data["model"], "spec.model"),
                      "train": from_dict(TrainConfig, data["train"], "spec.train")})


def train_on_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: build the host, rebuild the run, train it. Returns plain data and bytes only."""
    messages: list[str] = []
    try:
        host = Host(plugins=payload["plugins"])
        spec = rebuild_spec(payload["spec"], host)
        if spec.run_id != payload["run_id"]:
            raise PeftbenchError(f"the Ray worker on {socket.gethostname()} rebuilt run {payload['run_id']} as "
                                 f"{spec.run_id}: its peftbench or plugin versions differ from the driver's")
        checkpoint = _worker_checkpoint(payload["checkpoint"], spec.run_id, messages)
    except PeftbenchError as exc:
        outcome = Outcome(reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), error=exc)
    except Exception as exc:
        outcome = Outcome(reason=f"setting up the run on the Ray worker failed: {failure_reason(exc)}",
                          traceback=traceback.format_exc())
    else:
        outcome = train_outcome(spec, host, progress=False, checkpoint=checkpoint)
        if outcome.ok and checkpoint is not None:  # the driver may be on another node: no one else can
            checkpoint.remove()
    from safetensors.torch import save

    weights, final = ((save({k: v.contiguous() for k, v in tensors.items()})
                       if outcome.ok and tensors is not None else None)
                      for tensors in (outcome.weights, outcome.final_weights))
    return {"fields": outcome.fields, "weights": weights, "final_weights": final, "reason": outcome.reason,
            "traceback": outcome.traceback,
            "error": None if outcome.error is None else (type(outcome.error).__name__, str(outcome.error)),
            "log": messages, "host": socket.gethostname()}


def _worker_checkpoint(path: str | None, run_id: str, messages: list[str]):
    if path is None:
        return None
    from .checkpoint import Checkpoint

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # the driver's output folder does not exist on this node and cannot be made
        messages.append(f"no checkpoints for this run: {exc}")
        return None
    return Checkpoint(path, run_id, log=messages.append)


__all__ = ["LocalExecutor", "DistributedExecutor", "RayExecutor", "launched_processes", "is_main_process",
           "train_on_worker"]
