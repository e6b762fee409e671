"""Conformance kit: checks that a method plugin keeps the hook contract, for the plugin author's own tests.

Every check runs on the tiny random-init BERT of :mod:`peftbench.toys` (2 layers, hidden 32) and the
synthetic ``toy`` task, through the real host and trainer; all of them together take a few seconds::

    from peftbench.testing import check_method

    def test_dora_conforms():
        check_method("dora")                          # a method registered by an installed plugin
        check_method(MyMethod, params={"r": 4})       # or a Method subclass that no plugin registers yet

or, one pytest test per check::

    from peftbench.testing import MethodConformance

    class TestDoRA(MethodConformance):
        method = "dora"

The checks (names as in :data:`CHECKS`):

``hooks``         the class and its hook implementations are well-formed: pluggy accepts them (known hook
                  names, the hook's argument names), ``@hookimpl`` on every ``peftbench_*`` method, ``inject`` and
                  ``count_trainable`` implemented, ``solve_budget`` if the method is budget-matched,
                  ``state_dict``/``load_state_dict`` as a pair.
``frozen_base``   after ``peftbench_inject`` (and after training) every weight of the base model is still
                  frozen; only what the method created trains (``trains_base=True`` for full fine-tuning).
``counts``        ``peftbench_count_trainable`` on the meta model equals what injection creates (its ``peak``)
                  and, after training, ``final <= trainable <= peak``; ``final, nonzero <= peak``.
``budget``        ``peftbench_solve_budget`` meets LoRA-rank budgets on the tiny model within ``tolerance``,
                  returns the method's ``Params``, and injection with the solved params creates exactly the
                  solved count.
``state``         after a short training run, a checkpoint of it (the real :class:`~peftbench.checkpoint.Checkpoint`:
                  trainable tensors, all buffers, the loop state and ``peftbench_state_dict``, through
                  ``torch.save``/``torch.load(weights_only=True)``) is accepted by a freshly set-up run of
                  a new method instance, with another adapter initialisation (``peftbench_train_start``,
                  then the checkpoint's restore:
                  ``peftbench_load_state_dict``, then the tensors; see *Shape changes* in
                  :mod:`peftbench.hookspecs`), whose model then gives the trained model's outputs exactly;
                  the trainable tensors also save with safetensors (run artifacts).
``determinism``   two runs with the same seed give identical losses, metrics, weights and reports.
``return_types``  every hook returns the type :mod:`peftbench.hookspecs` documents (``inject``: ``True``,
                  ``count_trainable``: :class:`ParamCounts`, ``extra_loss``: a scalar tensor or ``None``,
                  ``report``: a JSON-serialisable dict, ``export_peft``: ``(dict, {str: Tensor})`` or ``None``…).

A failed check raises :class:`ConformanceError` (an ``AssertionError``) saying what was expected and found.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import hookspecs, modeling, toys
from .assembly import Assembled, assemble
from .checkpoint import Checkpoint
from .errors import PeftbenchError
from .hookspecs import API_VERSION, ParamCounts, TrainState, hookimpl
from .host import Host, PluginInfo
from .lora import rank_cost
from .method import Method
from .observers import observing
from .schema import from_dict, to_dict

CHECKS = ("hooks", "frozen_base", "counts", "budget", "state", "determinism", "return_types")

#: training of the kit's short runs: 64 toy examples, batch 16, 3 epochs = 12 optimizer steps, 3 evaluations
KIT_TRAIN = {"epochs": 3, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 32, "log_every": 1,
             "eval_batch_size": 32, "num_threads": 1, "deterministic": True, "device": "cpu"}

_REPORT_KEYS = {"ranks": dict, "rank_history": list, "counts": dict, "sparsity": (int, float)}


class ConformanceError(AssertionError):
    """A method broke the hook contract; the message names every failed check and what was found."""


class _Fail(Exception):
    """One failed check (collected by :meth:`Conformance.check`)."""


@dataclasses.dataclass
class _Run:
    result: Any = None  #: the trainer's RunResult
    error: str | None = None  #: "Type: message" and traceback tail when the run raised
    model: torch.nn.Module | None = None  #: the trained model (the one the hooks saw)
    method: Method | None = None  #: the run's method instance (it may hold per-run state)
    state: TrainState | None = None  #: the run's loop state (a trainer.LoopState), once training started
    spec: Any = None  #: the run's RunSpec
    base_ids: dict[int, str] = dataclasses.field(default_factory=dict)  #: base parameters at injection
    type_errors: list[str] = dataclasses.field(default_factory=list)


class Conformance:
    """The checks for one method (by registered name or class) with one set of params.

    ``params``: the method's params as in a config (a dict) or a ``Params`` instance; default ``Params()``.
    ``plugins``: extra plugin specs to load (``module[:attr]`` or ``file.py``), e.g. a local plugin.
    ``trains_base``: the method trains base weights on purpose (full fine-tuning): skips ``frozen_base``.
    ``budget_ranks``, ``tolerance``: the budgets (LoRA ranks on the tiny model) ``budget`` solves for, and the
    accepted relative miss. ``train``: overrides of :data:`KIT_TRAIN` for the short runs (a method whose
    schedule needs more steps). ``seed``: of the runs and the model.
    """

    def __init__(self, method: str | type[Method], params: dict[str, Any] | Any = None, *,
                 plugins: Sequence[str] = (), trains_base: bool = False, budget_ranks: Sequence[int] = (4, 16),
                 tolerance: float = 0.01, train: dict[str, Any] | None = None, seed: int = 0):
        self.method, self.raw_params, self.plugins = method, params, tuple(plugins)
        self.trains_base, self.budget_ranks, self.tolerance = trains_base, tuple(budget_ranks), tolerance
        self.train, self.seed = dict(train or {}), seed
        self._host: Host | None = None
        self._runs: list[_Run] = []

    # -- set-up --------------------------------------------------------------------------------------------

    @property
    def host(self) -> Host:
        if self._host is None:
            if isinstance(self.method, str):
                host = Host(plugins=self.plugins)
            else:  # a class under test: only it (and the toy tasks), so no installed plugin can interfere
                host = Host(plugins=self.plugins, entry_points=False)
                host.add_plugin(_ClassPlugin(self.method), PluginInfo(f"conformance:{self.method.__name__}", "object"))
            if "toy" not in host.tasks:
                host.add_plugin(toys, PluginInfo("peftbench.toys", "object"))
            self._host = host
        return self._host

    @property
    def cls(self) -> type[Method]:
        name = self.method if isinstance(self.method, str) else getattr(self.method, "name", None)
        if name not in self.host.methods:
            failed = "; ".join(f"{f.name}: {f.reason}" for f in self.host.failed)
            raise _Fail(f"method {name!r} is not registered" + (f" (failed plugins: {failed})" if failed else ""))
        return self.host.methods[name].obj

    @property
    def params(self) -> Any:
        cls = self.cls
        try:
            if self.raw_params is None:
                return cls.Params()
            if isinstance(self.raw_params, cls.Params):
                return self.raw_params
            return from_dict(cls.Params, dict(self.raw_params), "params")
        except (TypeError, ValueError, PeftbenchError) as exc:
            raise _Fail(f"cannot build {cls.Params.__name__} from {self.raw_params!r}: {exc}") from None

    def _config(self, params: Any = None):
        params = self.params if params is None else params
        method = {"name": self.cls.name, "params": to_dict(params), "match_budget": False}
        out = Path(tempfile.gettempdir()) / "peftbench-conformance"  # never written: runs store nothing
        return toys.tiny_config(out, methods=[method], train={**KIT_TRAIN, **self.train})

    def _assemble(self, meta: bool = False, inject: bool = True) -> Assembled:
        """The tiny model of the kit's config as runs and budgets build it (:func:`peftbench.assembly.assemble`):
        with the active method injected, or (``inject=False``) as budgets count on it."""
        config = self._config()
        return assemble(config.model, self.host.task(config.tasks[0]), self.host, self.seed, meta=meta,
                        inject=inject)

    def _model(self, meta: bool = False):
        """The tiny model of the kit's config as budgets see it, with its target modules and head."""
        built = self._assemble(meta=meta, inject=False)
        return built.model, built.targets, built.head

    def _inject(self, params: Any = None) -> _Injected:
        method = self.cls(self.params if params is None else params)
        base = _BaseRecorder()
        with self.host.activate(method), observing(self.host, base):
            built = self._assemble()
        head_names = built.head_names
        created = sum(p.numel() for n, p in built.model.named_parameters() if p.requires_grad and n not in head_names)
        return _Injected(built.model, built.targets, built.head, method, built.injected, base.ids, created)

    def _count(self, params: Any = None, meta: bool = True) -> ParamCounts:
        model, targets, head = self._model(meta=meta)
        with self.host.activate(self.cls(self.params if params is None else params)):
            return self.host.hook.peftbench_count_trainable(model=model, targets=targets, head=head)

    def _batch(self) -> dict[str, torch.Tensor]:
        tokenizer = modeling.load_tokenizer(self._config().model)
        texts = ["the movie was good and quite happy", "a dull plot and awful actors", "fine story, sad film"]
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))

    # -- the checks ------------------------------------------------------------------------------------

    def check(self, checks: Sequence[str] = CHECKS) -> None:
        """Run ``checks``; raise :class:`ConformanceError` naming every one that failed."""
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; the checks are {', '.join(CHECKS)}")
        failures = []
        for name in checks:
            try:
                getattr(self, f"_check_{name}")()
            except _Fail as exc:
                failures.append(f"[{name}] {exc}")
            except Exception as exc:  # a hook raised during the check: report it like a failed check
                tail = "".join(traceback.format_exception(exc)[-3:]).strip()
                failures.append(f"[{name}] raised {type(exc).__name__}: {exc}\n{tail}")
        if failures:
            raise ConformanceError(f"method {self._label()} failed {len(failures)} conformance check(s):\n"
                                   + "\n".join(failures))

    def _label(self) -> str:
        return repr(self.method) if isinstance(self.method, str) else self.method.__qualname__

    def _check_hooks(self) -> None:
        if not isinstance(self.method, str):
            cls = self.method
            if not (isinstance(cls, type) and issubclass(cls, Method)):
                raise _Fail(f"{cls!r} is not a peftbench.method.Method subclass")
            problems = _registration_problems(cls)
            if problems:
                raise _Fail(problems[0])
        cls = self.cls
        hooks = set(cls.implemented_hooks())
        problems = _registration_problems(cls) if isinstance(self.method, str) else []
        problems += [f"does not implement {h}" for h in ("peftbench_inject", "peftbench_count_trainable")
                     if h not in hooks]
        if cls.matches_budget and "peftbench_solve_budget" not in hooks:
            problems.append("matches_budget is True but peftbench_solve_budget is not implemented (set "
                            "matches_budget = False for a reference method that is not budget-matched)")
        pair = {"peftbench_state_dict", "peftbench_load_state_dict"}
        if len(hooks & pair) == 1:
            problems.append(f"implements {(hooks & pair).pop()} without {(pair - hooks).pop()}: saved state "
                            "would never be restored (or restored from nothing)")
        discovery = sorted(hooks & {"peftbench_add_methods", "peftbench_add_tasks"})
        if discovery:
            problems.append(f"implements {', '.join(discovery)} on the method class; discovery hooks belong to "
                            "the plugin module")
        if not dataclasses.is_dataclass(cls.Params):
            problems.append(f"Params ({cls.Params!r}) is not a dataclass")
        self.params  # noqa: B018 - raises _Fail when the params cannot be built
        if problems:
            raise _Fail("; ".join(problems))

    def _check_frozen_base(self) -> None:
        if self.trains_base:
            return
        injected = self._inject()
        head_names = modeling.head_parameter_names(injected.model, injected.head)
        head = {id(p) for n, p in injected.model.named_parameters() if n in head_names}  # every method trains it
        unfrozen = _unfrozen_base(injected.model, injected.base_ids, head)
        if unfrozen:
            raise _Fail(f"after peftbench_inject {len(unfrozen)} base parameter(s) are trainable, e.g. "
                        f"{unfrozen[:3]}; a PEFT method must leave the base frozen and train only what it creates "
                        "(pass trains_base=True only for a method that trains base weights on purpose)")
        run = self._run(0)
        if run.model is not None and run.result is not None:
            config = self._config().model
            head = modeling.head_parameter_names(run.model, modeling.head_modules(config, run.model))
            unfrozen = _unfrozen_base(run.model, run.base_ids, {id(p) for n, p in run.model.named_parameters()
                                                                if n in head})
            if unfrozen:
                raise _Fail(f"after training {len(unfrozen)} base parameter(s) are trainable, e.g. "
                            f"{unfrozen[:3]}: a run hook unfroze them")

    def _check_counts(self) -> None:
        counts = self._count()
        _expect_counts(counts, "peftbench_count_trainable (meta model)")
        created = self._inject().created
        if created != counts.peak:
            raise _Fail(f"peftbench_count_trainable says peak={counts.peak:,} but peftbench_inject made "
                        f"{created:,} parameters trainable (outside the head) on the same model")
        if created == 0:
            raise _Fail("peftbench_inject made no parameter trainable")
        real = self._count(meta=False)
        if real != counts:
            raise _Fail(f"peftbench_count_trainable differs between the meta model ({counts}) and a real one "
                        f"({real}); count from the shapes only")
        run = self._run(0)
        if run.result is not None:
            adapter = run.result.trainable["adapter"]
            if not counts.final <= adapter <= counts.peak:
                raise _Fail(f"after training {adapter:,} adapter parameters are trainable, outside "
                            f"[final={counts.final:,}, peak={counts.peak:,}] of peftbench_count_trainable")

    def _check_budget(self) -> None:
        cls = self.cls
        if not cls.matches_budget:
            return
        model, targets, head = self._model(meta=True)
        per_rank = rank_cost(targets)
        for rank in self.budget_ranks:
            target = rank * per_rank
            with self.host.activate(cls(self.params)):
                solved = self.host.hook.peftbench_solve_budget(model=model, targets=targets, head=head,
                                                               target=target, tolerance=self.tolerance)
            if not isinstance(solved, cls.Params):
                raise _Fail(f"peftbench_solve_budget(target={target:,}) returned {solved!r}, expected a "
                            f"{cls.Params.__name__} (the method is budget-matched)")
            counts = self._count(solved)
            _expect_counts(counts, f"peftbench_count_trainable with the solved params {solved}")
            miss = (counts.final - target) / target
            if abs(miss) > self.tolerance:
                raise _Fail(f"peftbench_solve_budget(target={target:,}, LoRA r={rank}) gave {solved} whose final "
                            f"count {counts.final:,} misses the target by {miss:+.2%} (tolerance "
                            f"{self.tolerance:.1%})")
            created = self._inject(solved).created
            if created != counts.peak:
                raise _Fail(f"with the solved params {solved} peftbench_count_trainable says peak="
                            f"{counts.peak:,} but peftbench_inject made {created:,} parameters trainable")

    def _check_state(self) -> None:
        from .trainer import setup

        run = self._trained_run()
        model, host = run.model, self.host
        model.eval()
        batch = self._batch()
        with torch.no_grad():
            expected = model(**batch).logits
        try:
            from safetensors.torch import save

            save({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad})
        except Exception as exc:
            raise _Fail(f"the trainable tensors cannot be saved with safetensors (run artifacts): "
                        f"{type(exc).__name__}: {exc}") from None
        # a checkpoint of the trained run, restored by a resumed run: a new method instance in a freshly set-up
        # run, peftbench_train_start as on a fresh start, then the checkpoint (the trainer's own resume path)
        messages: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Checkpoint(Path(tmp) / "checkpoint.pt", run.spec.run_id, log=messages.append)
            method = self.cls(run.method.params)
            try:
                with host.activate(run.method):
                    checkpoint.save(model, run.state, host)
                with host.activate(method), observing(host, _Reseed(self.seed + 9973)):  # other adapter init
                    fresh = setup(run.spec, host)
                    if "peftbench_train_start" in fresh.hooks:
                        host.hook.peftbench_train_start(model=fresh.raw_model, state=fresh.state)
                    restored = checkpoint.restore(fresh.raw_model, fresh.state, host)
            except Exception as exc:
                raise _Fail(f"saving the trained run's checkpoint or restoring it into a fresh run raised "
                            f"{type(exc).__name__}: {exc}\n"
                            + "".join(traceback.format_exception(exc)[-3:]).strip()) from None
        if not restored:
            raise _Fail(f"a fresh run refused the trained run's checkpoint: {'; '.join(messages)} (it is read "
                        "with torch.load(weights_only=True): peftbench_state_dict must return tensors, numbers, "
                        "strings, lists and dicts only; a layer whose shapes change declares "
                        "peftbench_resizable, see peftbench.hookspecs)")
        fresh.raw_model.eval()
        with torch.no_grad():
            got = fresh.raw_model(**batch).logits
        diff = (got - expected).abs().max().item()
        if not diff <= 1e-6:
            raise _Fail(f"after reloading the trained state into a fresh model the outputs differ by {diff:.3g}: "
                        "some state lives outside the parameters, buffers and peftbench_state_dict (e.g. a "
                        "tensor kept as a plain attribute)")

    def _check_determinism(self) -> None:
        first, second = self._trained_run(0), self._trained_run(1)
        a, b = first.result, second.result
        for label, x, y in (("dev metrics (best)", a.best, b.best), ("dev metrics (final)", a.final, b.final),
                            ("method report", _jsonable(a.method_report), _jsonable(b.method_report)),
                            ("trainable counts", a.trainable, b.trainable)):
            if x != y:
                raise _Fail(f"two runs with seed {self.seed} differ in their {label}: {x} vs {y}")
        for i, (x, y) in enumerate(zip(a.history, b.history)):
            if x != y:
                raise _Fail(f"two runs with seed {self.seed} differ at history entry {i}: {x} vs {y}; use the "
                            "torch/numpy/random generators (seeded by the host), never time, os.urandom or a "
                            "fresh unseeded generator")
        if (a.best_state is None) != (b.best_state is None):
            raise _Fail("one run kept its best weights and the other not")
        for name, tensor in (a.best_state or {}).items():
            if name not in b.best_state or not torch.equal(tensor, b.best_state[name]):
                raise _Fail(f"two runs with seed {self.seed} end with different weights, e.g. {name}")

    def _check_return_types(self) -> None:
        cls = self.cls
        problems = []
        problems += _result_problems("peftbench_count_trainable", self._count(), cls)
        if cls.matches_budget and "peftbench_solve_budget" in cls.implemented_hooks():
            model, targets, head = self._model(meta=True)
            target = self.budget_ranks[0] * rank_cost(targets)
            with self.host.activate(cls(self.params)):
                solved = self.host.hook.peftbench_solve_budget(model=model, targets=targets, head=head,
                                                               target=target, tolerance=self.tolerance)
            problems += _result_problems("peftbench_solve_budget", solved, cls)
        problems += _result_problems("peftbench_inject", self._inject().returned, cls)
        run = self._run(0)
        problems += run.type_errors  # recorded up to the point where a run failed, if it did
        if run.error:
            raise _Fail("; ".join(dict.fromkeys([*problems, f"the training run failed: {run.error}"])))
        if "peftbench_export_peft" in cls.implemented_hooks():  # after training, by the run's method instance
            _, targets, _ = self._model(meta=True)
            with self.host.activate(run.method):
                exported = self.host.hook.peftbench_export_peft(model=run.model, targets=targets)
            problems += _result_problems("peftbench_export_peft", exported, cls)
        if "peftbench_state_dict" in cls.implemented_hooks():
            with self.host.activate(run.method):
                parts = self.host.hook.peftbench_state_dict(model=run.model, state=run.state)
            problems += _result_problems("peftbench_state_dict", parts, cls)
        if problems:
            raise _Fail("; ".join(dict.fromkeys(problems)))

    # -- the short training runs (shared by the checks) ------------------------------------------------

    def _trained_run(self, index: int = 0) -> _Run:
        run = self._run(index)
        if run.error:
            raise _Fail(f"the training run failed: {run.error}")
        return run

    def _run(self, index: int) -> _Run:
        """The ``index``-th short run (0 or 1: the determinism check compares two), trained on first use."""
        while len(self._runs) <= index:
            self._runs.append(self._train())
        return self._runs[index]

    def _train(self) -> _Run:
        from .budget import solve_all
        from .runs import expand
        from .sweep import run_one

        run = _Run()
        try:
            config = self._config()
            (spec,) = expand(config, solve_all(config, self.host))
        except _Fail as exc:
            run.error = str(exc)
            return run
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            return run
        run.spec, cls = spec, self.cls

        def before(hook_name, hook_impls, kwargs):
            if hook_name == "peftbench_inject":
                run.model = kwargs["model"]
                run.base_ids = {id(p): name for name, p in run.model.named_parameters()}
                run.method = next((i.plugin for i in hook_impls if isinstance(i.plugin, cls)), None)

        def after(outcome, hook_name, hook_impls, kwargs):
            if isinstance(kwargs.get("state"), TrainState):
                run.state = kwargs["state"]
            if outcome.exception is None:
                run.type_errors += _result_problems(hook_name, outcome.get_result(), cls)

        undo = self.host.pm.add_hookcall_monitoring(before, after)
        try:
            with observing(self.host, _StateRecorder(run)):  # an observer, as a tracker would be
                run.result = run_one(spec, self.host, progress=False)
        except Exception as exc:
            tail = "".join(traceback.format_exception(exc)[-3:]).strip()
            run.error = f"{type(exc).__name__}: {exc}\n{tail}"
        finally:
            undo()
        return run


def check_method(method: str | type[Method], params: dict[str, Any] | Any = None, *,
                 checks: Sequence[str] = CHECKS, **options: Any) -> None:
    """Run the conformance checks on ``method``; raise :class:`ConformanceError` naming every failure.

    ``method``: the name of a method registered by an installed plugin, or a :class:`Method` subclass.
    ``options``: ``plugins``, ``trains_base``, ``budget_ranks``, ``tolerance``, ``train``, ``seed``
    (see :class:`Conformance`).
    """
    Conformance(method, params, **options).check(checks)


class MethodConformance:
    """One pytest test per conformance check. Subclass it as ``Test...`` and set ``method`` (and ``params``)::

        class TestMyMethod(MethodConformance):
            method = "mymethod"            # or the Method subclass
            params = {"r": 4}

    The short training runs are shared by the tests of one class.
    """

    method: ClassVar[str | type[Method]]
    params: ClassVar[dict[str, Any] | None] = None
    plugins: ClassVar[Sequence[str]] = ()
    trains_base: ClassVar[bool] = False
    budget_ranks: ClassVar[Sequence[int]] = (4, 16)
    tolerance: ClassVar[float] = 0.01
    train: ClassVar[dict[str, Any] | None] = None
    seed: ClassVar[int] = 0
    _kits: ClassVar[dict[type, Conformance]] = {}

    def conformance(self) -> Conformance:
        cls = type(self)
        if cls not in MethodConformance._kits:
            MethodConformance._kits[cls] = Conformance(
                cls.method, cls.params, plugins=cls.plugins, trains_base=cls.trains_base,
                budget_ranks=cls.budget_ranks, tolerance=cls.tolerance, train=cls.train, seed=cls.seed)
        return MethodConformance._kits[cls]

    def test_hooks_are_well_formed(self):
        self.conformance().check(["hooks"])

    def test_inject_leaves_base_frozen(self):
        self.conformance().check(["frozen_base"])

    def test_counts_match_injection(self):
        self.conformance().check(["counts"])

    def test_budget_solver_meets_target(self):
        self.conformance().check(["budget"])

    def test_state_saves_and_reloads(self):
        self.conformance().check(["state"])

    def test_deterministic_under_seed(self):
        self.conformance().check(["determinism"])

    def test_hooks_return_documented_types(self):
        self.conformance().check(["return_types"])


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


class _ClassPlugin:
    """A plugin object contributing one method class (a class under test that no installed plugin registers)."""

    PEFTBENCH_API_VERSION = API_VERSION

    def __init__(self, cls: type[Method]):
        self.cls = cls

    @hookimpl
    def peftbench_add_methods(self):
        return [self.cls]


@dataclasses.dataclass
class _Injected:
    model: torch.nn.Module
    targets: list
    head: list[str]
    method: Method
    returned: Any  #: what peftbench_inject returned
    base_ids: dict[int, str]  #: the base model's parameters (by identity) before injection
    created: int  #: trainable parameters outside the head after injection


def _unfrozen_base(model: torch.nn.Module, base_ids: dict[int, str], allowed: set[int]) -> list[str]:
    """Names (before injection) of base parameters of ``model`` that train, except ``allowed`` ones."""
    return [base_ids[id(p)] for p in model.parameters()
            if id(p) in base_ids and p.requires_grad and id(p) not in allowed]


class _StateRecorder:
    """An observer keeping the run's loop state (to checkpoint it after training)."""

    def __init__(self, run: _Run):
        self.run = run

    @hookimpl
    def peftbench_train_start(self, state):
        self.run.state = state


class _BaseRecorder:
    """Records the base model's parameters (by identity) right before the method injects its adapters."""

    def __init__(self):
        self.ids: dict[int, str] = {}

    @hookimpl(tryfirst=True)
    def peftbench_inject(self, model):
        self.ids = {id(p): name for name, p in model.named_parameters()}


class _Reseed:
    """Seeds the random generators right before injection: a resumed run's adapters start elsewhere than the
    trained run's did, so that state which only the same initialisation would restore is caught."""

    def __init__(self, seed: int):
        self.seed = seed

    @hookimpl(tryfirst=True)
    def peftbench_inject(self):
        torch.manual_seed(self.seed)


def _registration_problems(cls: type[Method]) -> list[str]:
    """Why the host would refuse method class ``cls`` (pluggy's check of its hook implementations, as for a
    run's method instance, and ``peftbench_*`` functions without ``@hookimpl``): the host's own check."""
    try:
        Host(entry_points=False).check_method_class(cls)
    except TypeError as exc:
        return [str(exc)]
    return []


def _expect_counts(counts: Any, where: str) -> None:
    problems = _result_problems("peftbench_count_trainable", counts, None)
    if problems:
        raise _Fail(problems[0].replace("peftbench_count_trainable", where, 1))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _result_problems(hook: str, result: Any, cls: type[Method] | None) -> list[str]:
    """How ``result`` of ``hook`` (as returned by the hook call) departs from the documented type."""
    spec = getattr(hookspecs, hook, None)
    first = bool(spec is not None and spec.peftbench_spec.get("firstresult"))
    results = [result] if first else list(result or [])
    problems = []
    for value in results:
        check = _CHECKERS.get(hook)
        problem = check(value, cls) if check else None
        if problem:
            problems.append(f"{hook} returned {_short(value)}: {problem}")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _none(value, cls):
    return None if value is None else "expected None (the return value of this hook is ignored)"


def _inject_result(value, cls):
    return None if value is True else "expected True (first result: a method that injected returns True)"


def _counts_result(value, cls):
    if not isinstance(value, ParamCounts):
        return "expected a peftbench.hookspecs.ParamCounts"
    fields = (value.final, value.peak, value.nonzero)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in fields):
        return "final, peak and nonzero must be non-negative ints"
    if not (value.final <= value.peak and value.nonzero <= value.peak):
        return "expected final <= peak and nonzero <= peak"
    return None


def _solve_result(value, cls):
    if value is None or cls is None or isinstance(value, cls.Params):
        return None
    return f"expected a {cls.Params.__name__} (the method's Params) or None"


def _extra_loss_result(value, cls):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.is_floating_point():
        return "expected a scalar (0-dim) floating-point tensor or None"
    return None


def _report_result(value, cls):
    if not isinstance(value, dict):
        return "expected a dict"
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        return f"expected JSON-serialisable values ({exc})"
    for key, kind in _REPORT_KEYS.items():
        if key in value and not isinstance(value[key], kind):
            return f"the conventional key {key!r} must hold a {getattr(kind, '__name__', 'number')}"
    counts = value.get("counts")
    if isinstance(counts, dict) and not {"final", "peak", "nonzero"} <= set(counts):
        return "the conventional key 'counts' must hold final, peak and nonzero"
    sparsity = value.get("sparsity")
    if isinstance(sparsity, (int, float)) and not (0 <= sparsity <= 1 or math.isnan(sparsity)):
        return "the conventional key 'sparsity' is a fraction in [0, 1]"
    return None


def _export_result(value, cls):
    if value is None:
        return None
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], dict)
            and isinstance(value[1], dict)):
        return "expected a tuple (adapter_config: dict, state_dict: dict) or None"
    config, state_dict = value
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        return f"adapter_config must be JSON-serialisable ({exc})"
    if "peft_type" not in config:
        return "adapter_config needs a 'peft_type' (e.g. 'LORA')"
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state_dict:
        return "state_dict must map PEFT key names to tensors" + (f" (e.g. {bad[0]!r})" if bad else " (it is empty)")
    return None


def _state_dict_result(value, cls):
    if not isinstance(value, dict):
        return "expected a dict"
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        return f"expected tensors, numbers, strings, lists and dicts only (torch.load(weights_only=True): {exc})"
    return None


_CHECKERS: dict[str, Callable[[Any, Any], str | None]] = {
    "peftbench_count_trainable": _counts_result,
    "peftbench_solve_budget": _solve_result,
    "peftbench_inject": _inject_result,
    "peftbench_train_start": _none,
    "peftbench_extra_loss": _extra_loss_result,
    "peftbench_after_backward": _none,
    "peftbench_after_optimizer_step": _none,
    "peftbench_on_log": _none,
    "peftbench_before_evaluate": lambda value, cls: None if value is None or callable(value) else (
        "expected a function that undoes the change, or None"),
    "peftbench_on_evaluate": _none,
    "peftbench_in_budget_from": lambda value, cls: None if value is None or (
        isinstance(value, int) and value >= 0) else "expected a step count (int >= 0) or None",
    "peftbench_train_end": _none,
    "peftbench_report": _report_result,
    "peftbench_export_peft": _export_result,
    "peftbench_state_dict": _state_dict_result,
    "peftbench_load_state_dict": _none,
}
