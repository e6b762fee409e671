"""The PEFT bridge: any HF PEFT tuner as a peftbench method, budget-matched by counting.

Each supported ``peft.PeftType`` is a method named ``peft:<type>`` (``peft:loha``, ``peft:oft``, ...; the list
is :data:`TUNERS`, ``peftbench plugins`` shows one row per tuner), whose params are the fields of the tuner's
PEFT config (``LoHaConfig``: ``r``, ``alpha``, ``rank_dropout``, ...) with PEFT's defaults. ``name: peft`` with
``params: {peft_type: LOHA, options: {...}}`` is the same method spelled generically; a ``peft_type`` the
bridge does not support is refused there with the reason.

* **Injection**: the sweep's target modules become the tuner's ``target_modules`` and PEFT's own tuner class
  injects its layers into the model in place (``LoHaModel(model, config, "default")``: the way
  ``get_peft_model`` does it, minus the ``PeftModel`` wrapper, which the trainer does not need). PEFT leaves
  only its adapter parameters trainable; the head is peftbench's, as for every method.
* **Counting** is PEFT's own: the tuner is injected into a meta-device copy of the model (no memory, no
  values: ``low_cpu_mem_usage``) and the trainable parameters counted, so ``peftbench budget`` works offline on
  DeBERTaV3-base or Llama-3.2-3B shapes. A tuner whose initialisation needs weight values (SHiRA's random
  mask) or builds buffers from values (BOFT's permutations) is counted on one real ``nn.Linear`` per distinct
  target shape instead.
* **Budgets**: each tuner has a size hyperparameter (:attr:`Tuner.size_key`; ``size_key:`` overrides it), solved
  by a monotone search over its valid values for the count nearest the target. Where PEFT takes per-module sizes
  (``rank_pattern``, ``n_frequency_pattern``, ``block_size_pattern``), the modules whose next size brings the
  count closer get it, as the built-in solvers mix ranks. Tuners of fixed size (IA3, LN tuning, BEFT, RoAd)
  are unmatched references like full fine-tuning (``matches_budget = False``); a tuner whose knob moves in
  steps too big for the tolerance on a model runs as one with ``match_budget: nearest`` (solved to its nearest
  size, listed as a reference).
* **Export** is PEFT's own state dict (``get_peft_model_state_dict``) and config: ``PeftModel.from_pretrained``
  reloads it.

What the bridge leaves out, and why, is :data:`UNSUPPORTED` (``docs/peft-bridge.md`` has the whole matrix).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import nn

from peftbench.errors import BudgetError, ConfigError, PeftbenchError
from peftbench.hookspecs import ParamCounts, TargetModule, hookimpl
from peftbench.method import Description, Method
from peftbench.schema import from_dict, suggest, to_dict

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"
__all__ = ["TUNERS", "UNSUPPORTED", "Tuner", "PeftTuner", "GenericPeft", "tuner_classes"]

ADAPTER = "default"


@dataclass(frozen=True)
class Tuner:
    """What the bridge knows about one PEFT tuner beyond its config class."""

    size_key: str | None  #: the hyperparameter that scales its size (``None``: fixed size, a reference)
    pattern: str | None = None  #: PEFT's per-module size field, for mixing sizes
    #: the values the size key may take on the targets: ``divisor`` (of every target's in_features),
    #: ``divisor_both`` (of in and out), ``multiple:<field>`` (of another param); default every integer >= 1
    values: str = ""
    count: Literal["meta", "shapes"] = "meta"  #: ``shapes``: initialisation needs values (one Linear per shape)
    targets: Literal["linear", "norms"] = "linear"  #: ``norms``: every normalisation layer outside the head
    #: config fields the bridge sets (not params): the choice between two size knobs made for the size key
    fixed: dict[str, Any] = field(default_factory=dict)
    #: defaults that differ from PEFT's, each for a reason given in ``note``
    defaults: dict[str, Any] = field(default_factory=dict)
    note: str = ""


#: the supported tuners (``peftbench.plugins.peft`` makes a ``peft:<type lower-cased>`` method of each)
TUNERS: dict[str, Tuner] = {
    "LORA": Tuner("r", "rank_pattern"),
    "LOHA": Tuner("r", "rank_pattern"),
    "LOKR": Tuner("r", "rank_pattern", defaults={"decompose_factor": 2},
                  note="PEFT's default factorisation (decompose_factor -1: both factors near sqrt(d)) caps LoKr's "
                       "size far below a LoRA r=8 budget on every model; the bridge's default is 2 (a 2x2 factor "
                       "times a rank-r d/2 x d/2 one)"),
    "OFT": Tuner("oft_block_size", values="divisor", fixed={"r": 0}),
    "BOFT": Tuner("boft_block_size", values="divisor", fixed={"boft_block_num": 0}, count="shapes",
                  note="builds dense in x in permutation buffers per module (values, not on the meta device)"),
    "VERA": Tuner("r", note="the shared random projections are buffers (regenerated from projection_prng_key), "
                            "not trained: only the per-module scaling vectors count"),
    "FOURIERFT": Tuner("n_frequency", "n_frequency_pattern"),
    "WAVEFT": Tuner("n_frequency", "n_frequency_pattern"),
    "HRA": Tuner("r"),
    "VBLORA": Tuner("num_vectors", note="the vector bank is shared by all modules and counted once"),
    "MISS": Tuner("r", values="divisor_out"),
    "RANDLORA": Tuner("r", note="more rank, fewer trainable scalings: the count falls as r grows"),
    "SHIRA": Tuner("r", count="shapes"),
    "C3A": Tuner("block_size", "block_size_pattern", values="divisor_both"),
    "DELORA": Tuner("r", "rank_pattern"),
    "GRALORA": Tuner("r", values="multiple:gralora_k"),
    "HIRA": Tuner("r", "rank_pattern"),
    "GLORA": Tuner("r"),
    "LILY": Tuner("r"),
    "PEANUT": Tuner("r"),
    "DEFT": Tuner("r"),
    "PSOFT": Tuner("r"),
    "PVERA": Tuner("r", note="VeRA's shared projections, probabilistic scaling vectors"),
    "TINYLORA": Tuner("u"),
    "OSF": Tuner("effective_rank", note="a trainable low-rank part of each weight's SVD: the count grows with "
                                        "effective_rank (PEFT's default: half of each weight's rank)"),
    "SUPERTUNING": Tuner("r"),
    "IA3": Tuner(None),
    "LN_TUNING": Tuner(None, targets="norms",
                       note="trains copies of the model's normalisation layers (outside the head), not the sweep's "
                            "target modules"),
    "BEFT": Tuner(None),
    "ROAD": Tuner(None, note="size set by `variant` (road_1/2/4): a reference at each"),
}

_PROMPT = ("a prompt-learning method: PEFT adds its virtual tokens in PeftModel.forward, which peftbench's trainer "
           "does not call (it calls the base model with its batch); supporting it needs trainer changes")
#: PEFT types the bridge refuses, with the reason (shown in config errors and the docs' matrix)
UNSUPPORTED: dict[str, str] = {
    "PROMPT_TUNING": _PROMPT, "MULTITASK_PROMPT_TUNING": _PROMPT, "P_TUNING": _PROMPT, "PREFIX_TUNING": _PROMPT,
    "CPT": _PROMPT, "CARTRIDGE": _PROMPT,
    "ADAPTION_PROMPT": "adapts Llama attention layers with prompts through PeftModel; needs trainer changes",
    "ADALORA": "needs update_and_allocate(step) after every step and total_step up front, and its final size "
               "depends on training; use the built-in `adalora` (budget-matched in parameters), or "
               "benchmarks.peft_baselines' hf_peft_adalora, which drives PEFT's own",
    "XLORA": "a mixture of already trained LoRA adapters, not a method trained from scratch",
    "POLY": "multi-task routing: needs task ids with every batch",
    "TRAINABLE_TOKENS": "trains embedding rows of chosen token ids, not an adapter on the target modules",
    "SHADOW": "trains a separate shadow network (PEFT refuses to inject it into a model)",
    "ADAMSS": "its initialisation (an SVD of the base weights) cannot run on the meta device, where budgets are "
              "counted",
    "FROD": "its joint decomposition of the base weights across layers needs their values: not countable on the "
            "meta device",
    "UNILORA": "its initialisation (a bincount over random indices shared by all modules) has no meta-device "
               "kernel, so budgets cannot be counted",
}

#: config fields the bridge sets itself: the targets are the sweep's, and nothing else of the base trains
_BRIDGE_FIELDS = {
    "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
    "target_parameters", "trainable_token_indices", "task_type", "peft_type", "base_model_name_or_path",
    "revision", "inference_mode", "auto_mapping", "fan_in_fan_out", "bias", "megatron_config", "megatron_core",
    "layer_replication", "ensure_weight_tying", "use_qalora", "qalora_group_size", "alora_invocation_tokens",
    "progressbar", "peft_version",
}


def _simple(tp: Any) -> bool:
    """Whether a config field's annotation is plain YAML data (numbers, strings, lists, mappings)."""
    if tp in (int, float, bool, str, type(None), Any, dict, list):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return all(isinstance(a, (int, float, bool, str)) for a in args)
    if origin in (Union, types.UnionType, list, dict):
        return all(_simple(a) for a in args)
    return False


def _fields(config_cls: type) -> list[tuple[str, Any, Any]]:
    """``(name, annotation, dataclasses.field)`` of the tuner's config fields a user may set."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.name in _BRIDGE_FIELDS or not f.init or not _simple(hints.get(f.name)):
            continue
        default = (field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                   else field(default=f.default))
        out.append((f.name, hints[f.name], default))
    return out


def _config_class(peft_type: str) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[peft_type]]


def _tuner_class(peft_type: str) -> type:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    return PEFT_TYPE_TO_TUNER_MAPPING[PeftType[peft_type]]


def _int_key(hint: Any) -> bool:
    return hint is int or (typing.get_origin(hint) in (Union, types.UnionType) and int in typing.get_args(hint))


def _make_params(peft_type: str, tuner: Tuner) -> type:
    """The method's ``Params``: the PEFT config's settable fields (PEFT's defaults), and ``size_key``."""
    fields = [(n, h, field(default=tuner.defaults[n]) if n in tuner.defaults else d)
              for n, h, d in _fields(_config_class(peft_type)) if n not in tuner.fixed]
    int_keys = sorted(n for n, h, _ in fields if _int_key(h))

    def __post_init__(self):
        key = self.size_key
        if key is not None and key not in int_keys:
            raise ValueError(f"size_key: {key!r} is not an integer field of {peft_type}'s config"
                             f"{suggest(key, int_keys)}; integer fields: {', '.join(int_keys)}")
        if tuner.size_key is None and key is not None:
            raise ValueError(f"size_key: {peft_type} has a fixed size (an unmatched reference): no size to solve")
        init = getattr(self, "init_lora_weights", True)
        if init not in (True, False, "gaussian"):  # PiSSA, OLoRA, EVA, LoftQ... rewrite the frozen base weights
            raise ValueError(f"init_lora_weights: {init!r} changes the frozen base weights (PEFT converts them back "
                             "only when saving through PeftModel); the bridge takes true, false or gaussian")

    size = [("size_key", str | None, field(default=tuner.size_key))]
    params = dataclasses.make_dataclass(f"Peft{peft_type.title().replace('_', '')}Params", fields + size,
                                        namespace={"__post_init__": __post_init__})
    params.__module__ = __name__
    return params


# ---------------------------------------------------------------------------------------------------------
# Counting on the meta device
# ---------------------------------------------------------------------------------------------------------


def meta_clone(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` on the meta device (shapes only), whatever device ``model`` is on."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def norm_layers(model: nn.Module) -> list[str]:
    """Every normalisation layer with parameters (LayerNorm, RMSNorm...) outside the head, by full name."""
    from peftbench.modeling import HEAD_NAMES

    return [name for name, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and any(True for _ in m.parameters(recurse=False))
            and name.split(".")[0] not in HEAD_NAMES and ".pooler" not in f".{name}"]


def _shapes_model(targets: list[TargetModule]) -> tuple[nn.Module, list[TargetModule]]:
    """One real ``nn.Linear`` per distinct target shape (for tuners whose initialisation reads values)."""
    root, stand_ins = nn.Module(), []
    for i, (n_in, n_out) in enumerate(sorted({(t.in_features, t.out_features) for t in targets})):
        root.add_module(f"shape{i}", nn.Linear(n_in, n_out, bias=False))
        stand_ins.append(TargetModule(f"shape{i}", None, 1, n_in, n_out, f"shape{i}"))
    return root, stand_ins


def _per_module(model: nn.Module, names: list[str]) -> tuple[int, dict[str, int]]:
    """Trainable parameters of ``model``: in total and per target module (a parameter shared by all modules,
    like VB-LoRA's vector bank, counts in the total only)."""
    total, per = 0, dict.fromkeys(names, 0)
    owner = {}
    for name, module in model.named_modules():
        if name in per:
            for p in module.parameters():
                owner.setdefault(id(p), name)
    for p in model.parameters():  # named_parameters() without duplicates: a shared tensor once
        if p.requires_grad:
            total += p.numel()
            if id(p) in owner:
                per[owner[id(p)]] += p.numel()
    return total, per


class PeftTuner(Method):
    """A PEFT tuner as a method (one subclass per supported ``PeftType``, made by :func:`tuner_classes`)."""

    peft_type: typing.ClassVar[str]
    tuner: typing.ClassVar[Tuner]
    peft_model: Any = None  #: PEFT's tuner (``LoHaModel``...) around the run's model, after injection

    # --- the PEFT config -------------------------------------------------------------------------------------

    def peft_config(self, model: nn.Module, targets: list[TargetModule], params: Any = None):
        params = params if params is not None else self.params
        values = {k: v for k, v in to_dict(params).items() if k != "size_key"}
        values["target_modules"] = [t.name for t in targets] if self.tuner.targets == "linear" else norm_layers(model)
        try:
            return _config_class(self.peft_type)(**values, **self.tuner.fixed)
        except (ValueError, TypeError) as exc:  # PEFT's own checks of its config
            raise ConfigError(f"{self.name} params: PEFT's {_config_class(self.peft_type).__name__} refused them: "
                              f"{exc}") from None

    def _attach(self, model: nn.Module, targets: list[TargetModule], params: Any = None, meta: bool = False):
        config = self.peft_config(model, targets, params)
        try:
            return _tuner_class(self.peft_type)(model, config, ADAPTER, low_cpu_mem_usage=meta)
        except (ValueError, TypeError, AssertionError, RuntimeError, KeyError) as exc:
            size = f" with {self.size_key}={getattr(params or self.params, self.size_key)}" if self.size_key else ""
            raise _Refused(f"{self.name}: PEFT cannot inject {self.peft_type}{size} into these target modules: "
                           f"{type(exc).__name__}: {exc}") from None

    @property
    def size_key(self) -> str | None:
        return self.params.size_key

    # --- budget ------------------------------------------------------------------------------------------

    def count(self, model: nn.Module, targets: list[TargetModule], params: Any = None) -> tuple[int, dict[str, int]]:
        """Trainable parameters PEFT creates with ``params`` (total, per target module), on shapes only."""
        if self.tuner.count == "shapes":
            stand_in, shape_targets = _shapes_model(targets)
            self._attach(stand_in, shape_targets, params)
            _, per_shape = _per_module(stand_in, [t.name for t in shape_targets])
            by_shape = {(t.in_features, t.out_features): per_shape[t.name] for t in shape_targets}
            per = {t.name: by_shape[(t.in_features, t.out_features)] for t in targets}
            return sum(per.values()), per
        with torch.device("meta"):  # what PEFT creates outside its parameters (VeRA's projections) too
            clone = meta_clone(model)
            self._attach(clone, targets, params, meta=True)
        return _per_module(clone, [t.name for t in targets])

    @hookimpl
    def peftbench_count_trainable(self, model, targets):
        try:
            n, _ = self.count(model, targets)
        except _Refused as exc:
            raise ConfigError(str(exc)) from None
        return ParamCounts(final=n, peak=n, nonzero=n)

    def candidates(self, targets: list[TargetModule]) -> list[int] | None:
        """The valid values of the size key on ``targets`` (sorted), or ``None`` for every integer >= 1."""
        rule = self.tuner.values if self.size_key == self.tuner.size_key else ""
        if rule.startswith("divisor"):
            dims = [t.in_features for t in targets]
            dims += [t.out_features for t in targets] if rule == "divisor_both" else []
            dims = [t.out_features for t in targets] if rule == "divisor_out" else dims
            g = functools.reduce(math.gcd, dims)
            return [d for d in range(1, g + 1) if g % d == 0]
        if rule.startswith("multiple:"):
            step = getattr(self.params, rule.partition(":")[2])
            return [step * i for i in range(1, 1 + max(t.in_features for t in targets) // step)]
        return None

    @hookimpl
    def peftbench_solve_budget(self, model, targets, target, tolerance):
        key = self.size_key
        values = self.candidates(targets)
        counted: dict[int, int | None] = {}

        def count_at(value: int) -> int | None:
            if value not in counted:
                try:
                    counted[value] = self.count(model, targets, self._at(value))[0]
                except _Refused:
                    counted[value] = None  # a value PEFT refuses on these shapes (e.g. a size above a dimension)
            return counted[value]

        below, above = _bracket(count_at, values, target)
        if below is None:
            raise BudgetError(f"{self.name}: no value of {key} that PEFT accepts on these target modules")
        best = min((below, above), key=lambda v: (abs(count_at(v) - target), v))
        pattern = self.tuner.pattern if key == self.tuner.size_key else None
        if pattern and abs(count_at(best) - target) > tolerance * target and None not in (below, above):
            mixed = self._mix(model, targets, target, below, above, pattern)
            if mixed is not None and abs(self.count(model, targets, mixed)[0] - target) < abs(count_at(best) - target):
                return mixed
        return self._at(best)

    def _at(self, value: int, **changes: Any) -> Any:
        pattern = {self.tuner.pattern: {}} if self.tuner.pattern and self.size_key == self.tuner.size_key else {}
        return self.with_params(**{self.size_key: value, **pattern, **changes})

    def _mix(self, model, targets, target: int, below: int, above: int, pattern: str) -> Any:
        """Size ``below`` everywhere, then ``above`` on the modules (largest step first) where that brings the
        total closer to ``target``: PEFT's per-module pattern, as the built-in solvers mix ranks."""
        low_total, low = self.count(model, targets, self._at(below))
        _, high = self.count(model, targets, self._at(above))
        remaining, mix = target - low_total, {}
        for t in sorted(targets, key=lambda t: high[t.name] - low[t.name], reverse=True):  # stable
            step = high[t.name] - low[t.name]
            if abs(remaining - step) < abs(remaining):
                mix[t.name] = above
                remaining -= step
        return self._at(below, **{pattern: mix})

    def describe(self, targets) -> Description:
        """The solved size (with its per-module mix) where ``peftbench budget`` shows the scale."""
        if self.size_key is None:
            return Description()
        value = getattr(self.params, self.size_key)
        mix = getattr(self.params, self.tuner.pattern, None) if self.tuner.pattern else None
        values = sorted({value, *(mix or {}).values()})
        return Description(f"{self.size_key}={'/'.join(map(str, values))}")

    # --- training and export -----------------------------------------------------------------------------

    @hookimpl
    def peftbench_inject(self, model, targets):
        try:
            self.peft_model = self._attach(model, targets)
        except _Refused as exc:
            raise ConfigError(str(exc)) from None
        return True

    @hookimpl
    def peftbench_report(self):
        size = {self.size_key: getattr(self.params, self.size_key)} if self.size_key else {}
        return {"peft": {"peft_type": self.peft_type, "version": _peft_version(), **size}}

    @hookimpl
    def peftbench_export_peft(self):
        """PEFT's own adapter state dict and config (keys as ``PeftModel.save_pretrained`` writes them)."""
        from peft.utils import get_peft_model_state_dict

        # PEFT selects the adapter's entries by module names as a PeftModel has them (its `base_model` is the
        # tuner): a shell with that one attribute gives them
        shell = nn.Module()
        shell.base_model, shell.peft_config = self.peft_model, self.peft_model.peft_config
        state = get_peft_model_state_dict(shell, adapter_name=ADAPTER)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        config = self.peft_model.peft_config[ADAPTER].to_dict()
        return json.loads(json.dumps(config, default=_jsonable)), state


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # an enum
        return value.value
    raise TypeError(f"not JSON-serialisable: {value!r}")


def _peft_version() -> str:
    import peft

    return peft.__version__


class _Refused(PeftbenchError):
    """PEFT refused a config or an injection (e.g. a block size that does not divide a dimension)."""


def _bracket(count_at: Callable[[int], int | None], values: list[int] | None, target: int
             ) -> tuple[int | None, int | None]:
    """The two valid values whose counts enclose ``target`` (count monotone in the value, either way), or the
    nearest end of the range twice when ``target`` is outside it."""
    if values is None:  # every integer >= 1: double until the count passes the target, then bisect
        lo, hi = 1, 1
        start = count_at(1)
        grows = None
        previous = start
        while hi < 2 ** 24:
            hi *= 2
            c = count_at(hi)
            if c is None or (c == previous and grows is not None):  # refused, or saturated (LoKr's full factor)
                break
            previous = c
            if grows is None and start is not None and c != start:
                grows = c > start
            if grows is not None and ((c >= target) if grows else (c <= target)):
                break
            lo = hi
        values = list(range(lo, hi + 1))
    valid = values
    # bisect on the index for the first value whose count is on the far side of the target
    first, last = _valid_end(count_at, valid, 0, 1), _valid_end(count_at, valid, len(valid) - 1, -1)
    if first is None:
        return None, None
    grows = count_at(valid[last]) >= count_at(valid[first])
    beyond = (lambda c: c >= target) if grows else (lambda c: c <= target)
    if not beyond(count_at(valid[last])):  # the target is out of reach: the smallest value of the largest count
        lo, hi = first, last
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probe = _valid_end(count_at, valid, mid, 1, stop=hi)
            lo, hi = (lo, probe) if count_at(valid[probe]) == count_at(valid[last]) else (probe, hi)
        best = lo if count_at(valid[lo]) == count_at(valid[last]) else hi
        return valid[best], valid[best]
    if beyond(count_at(valid[first])):
        return valid[first], valid[first]
    lo, hi = first, last  # invariant: not beyond at lo, beyond at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = _valid_end(count_at, valid, mid, 1, stop=hi)
        if probe is None or probe == hi:
            probe = _valid_end(count_at, valid, mid, -1, stop=lo)
            if probe is None or probe == lo:
                break
        if beyond(count_at(valid[probe])):
            hi = probe
        else:
            lo = probe
    return valid[lo], valid[hi]


def _valid_end(count_at, values: list[int], i: int, step: int, stop: int | None = None) -> int | None:
    """The first index from ``i`` in direction ``step`` (up to ``stop``) whose value PEFT accepts."""
    end = (len(values) if step > 0 else -1) if stop is None else stop + step
    for j in range(i, end, step):
        if count_at(values[j]) is not None:
            return j
    return None


def tuner_classes() -> dict[str, type[PeftTuner]]:
    """One method class per supported tuner, named ``peft:<type lower-cased>``."""
    return _tuner_classes()


@functools.cache
def _tuner_classes() -> dict[str, type[PeftTuner]]:
    classes = {}
    for peft_type, tuner in TUNERS.items():
        config_cls = _config_class(peft_type)
        size = f"size solved on {tuner.size_key}" if tuner.size_key else "fixed size: unmatched reference"
        classes[peft_type] = type(f"Peft{peft_type.title().replace('_', '')}", (PeftTuner,), {
            "name": f"peft:{peft_type.lower()}", "Params": _make_params(peft_type, tuner), "peft_type": peft_type,
            "tuner": tuner, "matches_budget": tuner.size_key is not None, "__module__": __name__,
            "description": f"HF PEFT {config_cls.__name__.removesuffix('Config')} through the bridge ({size})",
        })
    return classes


# ---------------------------------------------------------------------------------------------------------
# The generic spelling: name: peft, params: {peft_type: LOHA, options: {...}}
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GenericParams:
    peft_type: str = "LORA"  #: a ``peft.PeftType`` name (LOHA, OFT, ...)
    #: the tuner's config fields, as for ``peft:<type>`` (its size key is solved)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        key = str(self.peft_type).upper()
        if key in UNSUPPORTED:
            raise ValueError(f"peft_type: {key} is not supported by the PEFT bridge: {UNSUPPORTED[key]}; "
                             f"supported: {', '.join(TUNERS)}")
        if key not in TUNERS:
            raise ValueError(f"peft_type: unknown PEFT type {self.peft_type!r}{suggest(key, TUNERS)}; "
                             f"supported: {', '.join(TUNERS)}")
        self.peft_type = key
        try:
            self.tuned()
        except ConfigError as exc:
            raise ValueError(f"options: {str(exc).split(': ', 1)[-1]}") from None

    def tuned(self) -> Any:
        """The options as the tuner's own ``Params``."""
        return from_dict(_tuner_classes()[self.peft_type].Params, dict(self.options), "options")


class GenericPeft(Method):
    """``name: peft``: the tuner named by ``peft_type``, delegated to its ``peft:<type>`` method."""

    name = "peft"
    Params = GenericParams
    description = "any supported HF PEFT tuner by its PeftType (params: peft_type, options)"

    @property
    def inner(self) -> PeftTuner:
        if getattr(self, "_inner", None) is None:
            self._inner = _tuner_classes()[self.params.peft_type](self.params.tuned())
        return self._inner

    @hookimpl
    def peftbench_count_trainable(self, model, targets):
        return self.inner.peftbench_count_trainable(model, targets)

    @hookimpl
    def peftbench_solve_budget(self, model, targets, target, tolerance):
        if not self.inner.matches_budget:
            raise BudgetError(f"{self.params.peft_type} has a fixed size: name it `peft:"
                              f"{self.params.peft_type.lower()}` (an unmatched reference) or set match_budget: false")
        solved = self.inner.peftbench_solve_budget(model, targets, target, tolerance)
        return self.with_params(options=to_dict(solved))

    def describe(self, targets) -> Description:
        return self.inner.describe(targets)

    @hookimpl
    def peftbench_inject(self, model, targets):
        return self.inner.peftbench_inject(model, targets)

    @hookimpl
    def peftbench_report(self):
        return self.inner.peftbench_report()

    @hookimpl
    def peftbench_export_peft(self):
        return self.inner.peftbench_export_peft()


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@hookimpl
def peftbench_add_methods():
    if not _peft_available():  # an optional dependency: without it the bridge adds nothing
        return []
    return [GenericPeft, *_tuner_classes().values()]

