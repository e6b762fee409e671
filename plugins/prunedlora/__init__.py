"""PrunedLoRA (Yu et al., 2025, arXiv 2510.00192): gradient-based structured rank pruning with recovery.

Every target module starts as a LoRA adapter of an over-parameterized rank ``init_r`` and loses whole rank
components (column ``j`` of B with row ``j`` of A) during training until it reaches its target rank ``r``;
removed components never come back. The final count equals LoRA at rank ``r`` on the same modules, so the
budget solver matches ``r`` to the target and ``init_r = init_ratio · r`` (the peak count).

Algorithm (per pruning event, for every module above its target; :mod:`.pruning` has the derivation):

1. After backward, before the optimizer step, take ``G_B = ∂L/∂B`` and ``G_A = ∂L/∂A`` of the step and the
   curvature in rank space ``H_B = G_Bᵀ G_B``, ``H_A = G_A G_Aᵀ`` (``r' × r'``), damped by
   ``damping · mean(diag H)``.
2. Score ``S_j = ½‖b_j − (G_B H_B⁻¹)_{:,j}‖² / (H_B⁻¹)_jj + ½‖a_j − (H_A⁻¹ G_A)_{j,:}‖² / (H_A⁻¹)_jj``:
   the second-order Taylor estimate of the loss increase when component ``j`` is removed and the rest
   re-optimised; remove the smallest.
3. Recovery: update the survivors so that the model's estimated loss change is minimised. The closed-form
   minimiser is ``Δ_B = −G_B H_B⁻¹ − r_j (H_B⁻¹)_{j,:} / (H_B⁻¹)_jj``, ``r_j = b_j − (G_B H_B⁻¹)_{:,j}``
   (mirror for A); by default only its compensation part ``−b_j (H_B⁻¹)_{j,:} / (H_B⁻¹)_jj`` is applied,
   half on B and half on A (see below).
4. Repeat 2–3 ``prune_k`` times (H⁻¹ recomputed on the survivors, gradient moved along the model), then
   physically shrink A and B, their gradients and Adam's moments (:func:`peftbench.lora.keep_rank`), so the
   optimizer step that follows, and every later step, runs on the smaller tensors.

Schedule: the first event at ``warmup_ratio · total_steps``, then one every ``prune_every`` optimizer steps
(K1), each removing ``prune_k`` components per module (K2); every module reaches ``r`` before the last
``final_ratio · total_steps`` steps (checked at train start; ``prune_every: null`` spreads the events
evenly over that window instead). Our reading of the paper's best K1 = 10, K2 = 2: ten optimizer steps
between events, two components per module per event (128 → 64 takes 32 events, 320 steps).

Choices and differences from the paper, the authors' code and the shared notes (each a switch, default
first). Loss changes quoted are from ``python -m benchmarks.prunedlora_study`` (MiniLM on SST-2,
30 steps trained at init_r 32, one event removing 8 (16) components from every module, mean over three
held-out batches): no recovery +0.050 (+0.135).

* ``recovery_update: compensation | full``. ``full`` is the derived minimiser above; its Newton part
  ``−G H⁻¹`` scales like 1/‖G‖ (``H = GᵀG`` of one mini-batch is far smaller than the loss curvature) and
  raised the loss by +0.37 (+0.38) at the default damping and by +2.2 (+2.0) with ``damping: 1`` (a
  per-example Fisher did not rescue it in our trials; the full table is in docs/protocol.md). So the default applies only the compensation part, the optimal-brain-surgeon update that moves
  the removed component onto the survivors (scale-free in H). The released code's update has a shape bug
  and cannot be reproduced as written.
* ``recovery_factors: split | both | B | A``. Each factor's compensation alone (B with A fixed, or A with B
  fixed) already replaces the removed product ``b_j a_jᵀ``; applying both in full, the notes' literal
  reading, compensates it twice: −0.014 (+0.034) held-out but +0.022 (+0.117) on the scored batch itself.
  ``split`` applies half of each (a convex combination of two single compensations): +0.0014 (+0.0011);
  ``B``: +0.0033 (+0.0039), ``A``: +0.0004 (+0.0034). The score stays the notes' ``S_B + S_A``.
* ``curvature: step | ema``: the step's ``GᵀG`` as in the code, or a running average (``curvature_beta``),
  the "running Fisher" of the issue. No separate squared-gradient diagonal: the rank space is small enough
  for the full ``r' × r'`` matrix. Damping is relative (``damping · mean diag H``), not the code's ``1e-6``.
* Ablations: ``recovery: false`` drops the components without updating the survivors (they keep their
  values exactly); ``criterion: activation`` ranks by ``‖X a_jᵀ‖ · ‖b_j‖`` (Wanda-like, from the layer input
  since the last event), ``criterion: taylor`` by ``Σ |g · w|``. Each criterion runs in both readings:
  with the gradient criterion's recovery update (``recovery: true``, the default, with the same
  ``recovery_update``/``recovery_factors``), or without one (``recovery: false``), which is how the authors'
  Wanda-style baselines zero a component; "gradient beats activation" needs both readings to tell the criterion
  from the recovery (``configs/prunedlora_ablation.yaml`` has the labelled rows). ``peftbench budget`` lists
  every departure from the code/notes in its ``deviations`` column (:meth:`PrunedLoRA.describe`).
* A warm-up before the first event (the issue; the code starts at step 0, where ``B = 0`` makes every
  ``b_j`` and ``∂L/∂A`` vanish and the score degenerate) and a final phase at fixed ranks.
* Pruned components are removed physically (the issue) instead of masked (the code): exactly equivalent
  for AdamW (zero gradient and zero moments give a zero update), and each step gets cheaper as ranks shrink.
* Same target for every module (no cross-layer competition, as in the code); ``alpha`` defaults to
  ``init_r`` (scaling ``alpha / init_r = 1``, fixed for the whole run).

Single process only: a pruning event replaces parameters, which a DistributedDataParallel wrapper
(``accelerate launch`` on several devices) cannot follow.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from peftbench.errors import BudgetError, ConfigError
from peftbench.fields import Dropout, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Rank
from peftbench.hookspecs import ParamCounts, TargetModule, hookimpl
from peftbench.lora import inject_lora, lora_layers, lora_peft_export, rank_cost
from peftbench.method import Description, Method, departures

from .layer import PrunedLoRALinear
from .pruning import activation_scores, keep_indices, prune_components, rank_curvature, taylor_scores

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"
__all__ = ["PrunedLoRA", "PrunedLoRAParams", "PrunedLoRALinear", "Schedule", "plan_schedule"]


@dataclass
class PrunedLoRAParams:
    r: Rank = 8  #: target (final) rank of every module; the budget solver sets it
    init_r: int | None = None  #: initial rank; ``None``: ``init_ratio · r``
    init_ratio: PositiveInt = 4
    alpha: float | None = None  #: ``None``: ``alpha = init_r``; scaling ``alpha / init_r`` is fixed
    dropout: Dropout = 0.0
    prune_every: PositiveInt | None = 10  #: K1, optimizer steps between events; ``None``: spread over the window
    prune_k: PositiveInt = 2  #: K2, components removed per module per event
    warmup_ratio: NonNegativeFloat = 0.1  #: fraction of the steps before the first event
    final_ratio: NonNegativeFloat = 0.1  #: fraction of the steps at the end with fixed (target) ranks, at least
    criterion: Literal["gradient", "activation", "taylor"] = "gradient"
    recovery: bool = True
    recovery_update: Literal["compensation", "full"] = "compensation"
    #: how the B-side and A-side updates combine: ``split`` applies half of each (see the docstring)
    recovery_factors: Literal["split", "both", "B", "A"] = "split"
    #: relative damping of H: ``damping · mean(diag H)``; > 0, as the step's GᵀG can be singular (fewer tokens
    #: than components)
    damping: PositiveFloat = 1e-2
    curvature: Literal["step", "ema"] = "step"
    curvature_beta: Fraction = 0.9  #: EMA coefficient for ``curvature: ema``

    def __post_init__(self):
        if self.init_r is not None and self.init_r < self.r:
            raise ValueError(f"init_r must be >= r (the target rank {self.r}), got {self.init_r}")
        if self.warmup_ratio + self.final_ratio >= 1:
            raise ValueError(f"warmup_ratio and final_ratio must have a sum < 1, got "
                             f"{self.warmup_ratio} and {self.final_ratio}")

    @property
    def initial_rank(self) -> int:
        return self.init_r if self.init_r is not None else self.init_ratio * self.r


@dataclass(frozen=True)
class Schedule:
    first: int  #: step index of the first event
    every: int  #: optimizer steps between events (K1)
    events: int  #: events needed to bring every module to its target
    end: int  #: first step of the final fixed phase

    @property
    def last(self) -> int:
        return self.first + (self.events - 1) * self.every


def plan_schedule(params: PrunedLoRAParams, total_steps: int) -> Schedule:
    """When the pruning events happen; a clear error naming the keys when they cannot all fit."""
    events = math.ceil((params.initial_rank - params.r) / params.prune_k)
    first = round(params.warmup_ratio * total_steps)
    end = total_steps - round(params.final_ratio * total_steps)
    every = params.prune_every
    if every is None:
        every = (end - first) // max(events, 1)
    schedule = Schedule(first, max(every, 1), events, end)
    if events and (every < 1 or schedule.last >= end):
        raise ConfigError(
            f"prunedlora: {events} pruning events (init_r={params.initial_rank} → r={params.r}, "
            f"prune_k={params.prune_k}) every prune_every={params.prune_every} steps from step {first} "
            f"(warmup_ratio={params.warmup_ratio}) do not fit before step {end} (final_ratio="
            f"{params.final_ratio}) of {total_steps}; lower init_r/init_ratio, prune_every or the ratios, "
            f"raise prune_k, or set prune_every: null to spread the events over the window")
    return schedule


#: the authors' code and the notes' derived rule (full update applied to both factors, no warm-up, K1 = 10,
#: K2 = 2, alpha = init_r); ``describe`` lists every departure, the measured defaults included. The authors'
#: activation and Taylor baselines have no recovery: for them ``recovery: true`` is the departure
REFERENCE = {"criterion": "gradient", "recovery": True, "recovery_update": "full", "recovery_factors": "both",
             "curvature": "step", "prune_every": 10, "prune_k": 2, "warmup_ratio": 0.0, "alpha": None}

#: weights of the B-side and A-side recovery updates
FACTOR_WEIGHTS = {"split": (0.5, 0.5), "both": (1.0, 1.0), "B": (1.0, 0.0), "A": (0.0, 1.0)}


class PrunedLoRA(Method):
    name = "prunedlora"
    Params = PrunedLoRAParams
    description = "PrunedLoRA (Yu et al.): LoRA from init_r pruned to r by gradient-based scores with recovery"

    def __init__(self, params=None):
        super().__init__(params)
        self.layers: dict[str, PrunedLoRALinear] = {}
        self.rank_history: list[dict] = []
        self.schedule: Schedule | None = None
        self._next_event = 0
        self._done = False

    # --- budget ------------------------------------------------------------------------------------------

    @hookimpl
    def peftbench_count_trainable(self, targets):
        per_rank = rank_cost(targets)
        return ParamCounts(final=self.params.r * per_rank, peak=self.params.initial_rank * per_rank,
                           nonzero=self.params.r * per_rank)

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        per_rank = rank_cost(targets)
        r = max(1, round(target / per_rank))
        if self.params.init_r is not None and self.params.init_r < r:
            raise BudgetError(f"prunedlora: init_r={self.params.init_r} is below the solved target rank {r}; "
                              f"remove init_r (init_ratio · r is used) or raise it")
        init_r = self.params.init_r if self.params.init_r is not None else self.params.init_ratio * r
        return self.with_params(r=r, init_r=init_r)

    def describe(self, targets) -> Description:
        """Scale ``alpha / init_r`` (fixed for the run) with ``alpha / r`` at the final rank beside it, and
        every switch departing from the code/notes: the recovery defaults, the warm-up and relative damping
        included (the code damps by 1e-6·I)."""
        p = self.params
        alpha = p.alpha if p.alpha is not None else float(p.initial_rank)
        reference = {**REFERENCE, "recovery": p.criterion == "gradient"}
        if not p.recovery:
            reference = {k: v for k, v in reference.items() if not k.startswith("recovery_")}
        curvature = p.criterion == "gradient" or p.recovery  # the damped H is used at all
        damping = [f"damping={p.damping:g}·mean(diag H)"] if curvature else []
        return Description(f"{alpha / p.initial_rank:.2f} (α/r_final {alpha / p.r:.2f})",
                           departures(p, reference) + damping)

    # --- injection and training --------------------------------------------------------------------------

    @hookimpl
    def peftbench_inject(self, model, targets):
        init_r = self.params.initial_rank
        alpha = self.params.alpha if self.params.alpha is not None else float(init_r)
        self.layers = inject_lora(model, targets, lambda t: init_r, lambda t: alpha, self.params.dropout,
                                  layer_cls=PrunedLoRALinear, target_r=self.params.r)
        return True

    @hookimpl
    def peftbench_in_budget_from(self, total_steps):
        """In budget after the step of the last pruning event (every module at its target rank then)."""
        schedule = plan_schedule(self.params, total_steps)
        return schedule.last + 1 if schedule.events else 0

    @hookimpl
    def peftbench_train_start(self, model, state):
        self.layers = lora_layers(model, PrunedLoRALinear)
        if getattr(state.accelerator, "num_processes", 1) > 1:
            raise RuntimeError("prunedlora replaces parameters during training and supports one process only")
        self.schedule = plan_schedule(self.params, state.total_steps)
        self._next_event = self.schedule.first
        self._done = self.schedule.events == 0
        self.rank_history = [{"step": 0, "ranks": self.ranks()}]
        if not self._done:
            for layer in self.layers.values():
                if self.params.criterion == "activation":
                    layer.input_energy = torch.zeros(layer.r, device=layer.lora_A.device)
        self._log(state)

    @hookimpl
    def peftbench_after_backward(self, state):
        if self._done:
            return
        if self.params.curvature == "ema":
            self._update_curvature_ema(state)
        if state.step >= self._next_event:
            self._prune_event(state)

    @hookimpl
    def peftbench_train_end(self, state):
        late = {name: layer.r for name, layer in self.layers.items() if layer.r != layer.target_r}
        if late:
            raise RuntimeError(f"prunedlora: modules did not reach their target rank {self.params.r}: {late}")

    # --- the pruning event -------------------------------------------------------------------------------

    def _grads(self, layer: PrunedLoRALinear, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """∂L/∂B and ∂L/∂Aᵀ as float32 (unscaled when a fp16 loss scaler is active; zeros if unused)."""
        grads = []
        for p in (layer.lora_B, layer.lora_A):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g.float() / scale)
        return grads[0], grads[1].T

    def _groups(self) -> dict[tuple, list[PrunedLoRALinear]]:
        """Modules above their target, grouped by shape, rank and components to remove (one batch each)."""
        groups = defaultdict(list)
        for layer in self.layers.values():
            k = min(self.params.prune_k, layer.r - layer.target_r)
            if k > 0:
                groups[(layer.out_features, layer.in_features, layer.r, k)].append(layer)
        return groups

    @torch.no_grad()
    def _update_curvature_ema(self, state) -> None:
        scale = _loss_scale(state)
        beta = self.params.curvature_beta
        for layers in self._groups().values():
            g_b, g_a = zip(*(self._grads(layer, scale) for layer in layers))
            fresh = rank_curvature(torch.stack(g_b)), rank_curvature(torch.stack(g_a))
            if not all(torch.isfinite(h).all() for h in fresh):
                continue
            for i, layer in enumerate(layers):
                new = (fresh[0][i], fresh[1][i])
                layer.curvature_ema = new if layer.curvature_ema is None else tuple(
                    beta * old + (1 - beta) * h for old, h in zip(layer.curvature_ema, new))

    @torch.no_grad()
    def _prune_event(self, state) -> None:
        params, scale = self.params, _loss_scale(state)
        plans = []
        for (_, _, rank, k), layers in self._groups().items():
            b = torch.stack([layer.lora_B.detach().float() for layer in layers])
            a_t = torch.stack([layer.lora_A.detach().float().T for layer in layers])
            g_b, g_a_t = (torch.stack(g) for g in zip(*(self._grads(layer, scale) for layer in layers)))
            if not (torch.isfinite(g_b).all() and torch.isfinite(g_a_t).all()):
                return  # an overflowing fp16 step (skipped by the scaler): prune at the next step instead
            if params.curvature == "ema" and all(layer.curvature_ema is not None for layer in layers):
                h_b, h_a = (torch.stack(h) for h in zip(*(layer.curvature_ema for layer in layers)))
            else:
                h_b, h_a = rank_curvature(g_b), rank_curvature(g_a_t)
            fixed = None
            if params.criterion == "activation":
                fixed = activation_scores(b, torch.stack([layer.input_energy for layer in layers]))
            elif params.criterion == "taylor":
                fixed = taylor_scores(b, g_b, a_t, g_a_t)
            plans.append((layers, rank, k, b, a_t, g_b, g_a_t, h_b, h_a, fixed))
        for layers, rank, k, b, a_t, g_b, g_a_t, h_b, h_a, fixed in plans:
            removed = prune_components([(b, g_b, h_b), (a_t, g_a_t, h_a)], k, fixed,
                                       params.recovery_update if params.recovery else "none", params.damping,
                                       FACTOR_WEIGHTS[params.recovery_factors])
            keep = keep_indices(removed, rank)
            for i, layer in enumerate(layers):
                layer.keep_components(keep[i], b[i], a_t[i].T, state.optimizer)
        self.rank_history.append({"step": state.step, "ranks": self.ranks()})
        self._next_event = state.step + self.schedule.every
        if all(layer.r == layer.target_r for layer in self.layers.values()):
            self._done = True
            for layer in self.layers.values():  # no per-step extra work from here on: plain LoRA layers
                layer.input_energy = None
                layer.curvature_ema = None
        self._log(state)

    # --- checkpoints: schedule position, component ids and the criterion's running statistics ------------
    # (the shrunk A and B are tensors of the model: the host restores them, each layer taking the saved rank)

    @hookimpl
    def peftbench_state_dict(self):
        return {"prunedlora": {
            "next_event": self._next_event, "done": self._done, "rank_history": self.rank_history,
            "layers": {name: {"component_ids": layer.component_ids.clone(), "input_energy": layer.input_energy,
                              "curvature_ema": None if layer.curvature_ema is None else list(layer.curvature_ema)}
                       for name, layer in self.layers.items()},
        }}

    @hookimpl
    def peftbench_load_state_dict(self, model, state_dict):
        """The method's Python state only; ``state.logs`` (rank, adapter_params) comes back with the run's."""
        saved = state_dict.get("prunedlora")
        if saved is None:
            return
        self.layers = lora_layers(model, PrunedLoRALinear)
        for name, layer in self.layers.items():
            entry = saved["layers"][name]
            device = layer.lora_A.device
            layer.component_ids = entry["component_ids"].clone()
            energy = entry["input_energy"]
            layer.input_energy = None if energy is None else energy.to(device)
            ema = entry["curvature_ema"]
            layer.curvature_ema = None if ema is None else tuple(h.to(device) for h in ema)
        self._next_event, self._done = saved["next_event"], saved["done"]
        self.rank_history = saved["rank_history"]

    # --- reporting and export ----------------------------------------------------------------------------

    def ranks(self) -> dict[str, int]:
        return {name: layer.r for name, layer in self.layers.items()}

    def adapter_count(self) -> int:
        return sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers.values())

    def peak_count(self) -> int:
        return sum(layer.init_r * rank_cost(layer) for layer in self.layers.values())

    def _log(self, state) -> None:
        state.logs["rank"] = sum(layer.r for layer in self.layers.values()) / max(len(self.layers), 1)
        state.logs["adapter_params"] = self.adapter_count()

    @hookimpl
    def peftbench_report(self, model):
        self.layers = lora_layers(model, PrunedLoRALinear)
        nonzero = sum(int(torch.count_nonzero(layer.lora_A)) + int(torch.count_nonzero(layer.lora_B))
                      for layer in self.layers.values())
        schedule = self.schedule
        return {
            "ranks": self.ranks(),
            "rank_history": self.rank_history,
            "counts": {"final": self.adapter_count(), "peak": self.peak_count(), "nonzero": nonzero},
            "schedule": None if schedule is None else {
                "first_event": schedule.first, "every": schedule.every, "events": schedule.events,
                "last_event": schedule.last, "final_phase_from": schedule.end},
        }

    @hookimpl
    def peftbench_export_peft(self, model, targets: list[TargetModule]):
        """HF PEFT's LoRA format: per-module ranks in ``rank_pattern``, the scale fixed at ``alpha / init_r``
        expressed as PEFT's ``lora_alpha / r`` through ``alpha_pattern`` (LoRA's shared exporter)."""
        layers = lora_layers(model, PrunedLoRALinear)
        if not layers:
            return None
        return lora_peft_export({name: (m.lora_A, m.lora_B, m.scaling) for name, m in layers.items()})


def _loss_scale(state) -> float:
    scaler = getattr(state.accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


@hookimpl
def peftbench_add_methods():
    return [PrunedLoRA]
