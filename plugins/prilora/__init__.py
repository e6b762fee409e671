"""PRILoRA (Benedek & Wolf, Findings of EACL 2024, arXiv 2401.11316): pruned and rank-increasing LoRA.

Algorithm, on top of plain LoRA (``W x + (alpha / r_l) · B A x`` on every target module):

1. **Rank increasing with depth.** Layer ``l`` of ``L`` gets rank ``r_l`` on a linear ramp from
   ``r · (1 - spread)`` to ``r · (1 + spread)``; every module of a layer shares its layer's rank. The integers
   sum to exactly ``r · L`` (see :mod:`.ranks`), so the adapter has as many parameters as uniform LoRA of rank
   ``r``: on DeBERTaV3-base, ``r = 8, spread = 0.5`` is the paper's 4 → 12 with 1,327,104 parameters.
2. **Ongoing pruning of A.** Every module keeps an EMA of the L2 norm of each input feature ``x_j`` (over all
   tokens of a batch, collected in the forward pass). Every ``prune_every`` optimizer steps the entries of A
   with the lowest ``|A_kj| · EMA‖x_j‖`` are zeroed, ``prune_ratio`` of every row of A. Zeroed entries keep
   training and may regrow until the next event; a final event after the last step leaves the reported
   sparsity (half of A = about a quarter of the adapter at the default ratio 0.5).

Ablations (config switches): ``schedule`` (``increasing`` | ``uniform`` | ``decreasing`` | a list of per-layer
ranks) and ``criterion`` (``input_norm`` | ``magnitude`` | ``random`` | ``prune_b`` | ``none``); see
:mod:`.pruning` for the scores (``prune_b``'s is defined here: ``|B_ik| · EMA‖(A x)_k‖``). Every criterion
prunes the same number of entries: ``prune_b`` removes from B of every layer exactly the count ``input_norm``
removes from A (spread over B's rows as evenly as possible; :mod:`.pruning` says how), not ``⌊ratio · r⌋`` per
row of B, which on odd ranks would prune fewer entries and compare sparsities instead of criteria.

Choices the paper leaves open ([open] in the method notes), each a param with its default:
``ema = 0.9``; ``grouping = "row"`` (each row of A loses the same number of entries; ``"matrix"``: one
threshold per matrix); ``prune_every = 10`` optimizer steps from ``prune_start = 0`` (fraction of training);
``permanent = False`` (re-prune: zeroed weights keep their optimizer state and may regrow; ``True``: the first
event fixes a mask that is re-applied after every optimizer step, the masked entries' optimizer state is zeroed
too, and later events, which would pick the same entries, are skipped).

**The per-layer scale rule is not stated by the paper** (and is not in the method notes), yet it moves the
comparison: with ranks 4 → 12 it decides whether the bottom layer's update is scaled 3× more than the top's.
It is the param ``scaling``: ``"alpha_over_rank"`` (default: ``alpha / r_l`` per layer, what LoRA code and HF
PEFT's ``rank_pattern`` do with one ``lora_alpha``, e.g. ``4.00 → 1.33`` at ``alpha = 16``) or ``"constant"``
(``alpha / r`` on every layer, the scale of uniform LoRA at the mean rank). ``peftbench budget`` shows the
resulting per-layer scales (column ``scale``) and lists ``scaling`` among the run's deviation switches
(column ``deviations``, marked ``[open]``) whatever its value, with every other switch that departs from the
paper or the notes' defaults (:meth:`PRILoRA.describe`).

Intentional details: the input statistic includes padding tokens (a linear layer does not see the attention
mask; the score compares features within one module, so a common factor cancels); ``⌊ratio · n⌋`` entries are
pruned per group; explicit rank lists are used as given (budget matching cannot rescale them: the host
reports their miss); modules outside the transformer blocks, if targeted, get rank ``round(r)``.
Every dev evaluation sees the pruned adapter: the entries an event would prune at that moment are zeroed for
the evaluation and given back after it (training is unchanged), so PRILoRA is always evaluated at its budget.
In a multi-process run the EMAs are averaged over the processes before every pruning event (each process sees
a shard of the batch), so every replica prunes the same entries. Runs are resumable (``output.checkpoint``):
the event count, the EMA flags, the ``random`` generator and the permanent masks are checkpointed; the EMAs
themselves are buffers, saved with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from annotated_types import Interval
from torch import nn

from peftbench.errors import ConfigError
from peftbench.fields import Dropout, Fraction, PositiveFloat, PositiveInt
from peftbench.hookspecs import ParamCounts, TargetModule, TrainState, hookimpl
from peftbench.lora import inject_lora, lora_peft_export, rank_cost
from peftbench.method import Description, Method, departures, scale_range

from .layer import InputNorms, PRILoRALinear
from .pruning import Criterion, Grouping, expected_pruned, importance, prune_mask
from .ranks import layer_ranks

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"
__all__ = ["PRILoRA", "PRILoRAParams", "PRILoRALinear", "layer_ranks"]


@dataclass
class PRILoRAParams:
    r: PositiveFloat = 8.0  #: mean rank per layer: the budget (solved by budget matching)
    alpha: float = 16.0
    dropout: Dropout = 0.0
    #: ``increasing`` (paper) | ``uniform`` | ``decreasing`` | explicit per-layer ranks, first layer first
    schedule: Literal["increasing", "uniform", "decreasing"] | list[int] = "increasing"
    spread: Fraction = 0.5  #: ramp from r·(1-spread) to r·(1+spread): 0.5 is the paper's 4 → 12 at r = 8
    #: per-layer scale rule, NOT stated by the paper ([open]): ``alpha_over_rank``: alpha / r_l per layer;
    #: ``constant``: alpha / r (the mean rank) on every layer. Always listed by ``peftbench budget``.
    scaling: Literal["alpha_over_rank", "constant"] = "alpha_over_rank"
    criterion: Criterion = "input_norm"
    prune_ratio: Fraction = 0.5  #: fraction of each group zeroed at every event (paper's best: 0.5)
    prune_every: PositiveInt = 10  #: optimizer steps between pruning events
    prune_start: Annotated[float, Interval(ge=0, le=1)] = 0.0  #: fraction of training before the first event
    grouping: Grouping = "row"
    ema: Fraction = 0.9  #: EMA coefficient of the activation norms (weight of the old value)
    permanent: bool = False  #: sticky mask fixed at the first event (default: re-prune, weights may regrow)

    def __post_init__(self):
        if isinstance(self.schedule, list) and (not self.schedule or min(self.schedule) < 1):
            raise ValueError(f"schedule: an explicit list needs one rank >= 1 per layer, got {self.schedule}")

    def layer_ranks(self, num_layers: int) -> list[int]:
        """The rank of every transformer layer; raises :class:`ConfigError` naming the key on bad input."""
        if isinstance(self.schedule, list):
            if len(self.schedule) != num_layers:
                raise ConfigError(f"prilora: params.schedule lists {len(self.schedule)} ranks but the model has "
                                  f"{num_layers} transformer layers (give one rank per layer)")
            return list(self.schedule)
        ranks = layer_ranks(num_layers, self.r, self.schedule, self.spread)
        if min(ranks) < 1:
            raise ConfigError(f"prilora: params r={self.r:g} with spread={self.spread:g} gives rank "
                              f"{min(ranks)} to layer {ranks.index(min(ranks))} ({ranks}); raise r or lower spread")
        return ranks

    def module_ranks(self, targets: list[TargetModule]) -> dict[str, int]:
        """Rank of every target module: its layer's rank (``round(r)`` outside the transformer blocks)."""
        num_layers = targets[0].num_layers if targets else 0
        ranks = self.layer_ranks(num_layers) if num_layers else []
        return {t.name: ranks[t.layer] if t.layer is not None else max(1, round(self.r)) for t in targets}

    def alpha_for(self, rank: int, mean_rank: float) -> float:
        return self.alpha if self.scaling == "alpha_over_rank" else self.alpha * rank / mean_rank


@torch.no_grad()
def sync_statistics(layers) -> None:
    """Average the feature-norm EMAs over the processes of a distributed run.

    Each process sees its own shard of every batch, so its EMAs differ; the weights are the same on every
    process (DDP averages the gradients), and averaging the EMAs before scoring makes every process prune the
    same entries. One all-reduce per pruning event; nothing at all in a single-process run.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    emas = [layer.norm_ema for layer in layers]
    flat = torch.cat(emas)
    torch.distributed.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(emas, list(flat.split([e.numel() for e in emas])))


#: the paper's choices and the notes' defaults for its [open] ones; ``describe`` lists every departure
REFERENCE = {"schedule": "increasing", "spread": 0.5, "criterion": "input_norm", "prune_ratio": 0.5,
             "grouping": "row", "prune_every": 10, "prune_start": 0.0, "ema": 0.9, "permanent": False}


def prune_counts(params: PRILoRAParams, targets: list[TargetModule]) -> dict[str, int]:
    """Entries each module's pruned matrix loses at an event (``prune_b``: A's count, matched per layer)."""
    ranks = params.module_ranks(targets)
    modules = [(t.layer, ranks[t.name], t.in_features, t.out_features) for t in targets]
    counts = expected_pruned(params.criterion, params.grouping, params.prune_ratio, modules)
    return {t.name: n for t, n in zip(targets, counts)}


def _counts(params: PRILoRAParams, targets: list[TargetModule]) -> ParamCounts:
    ranks = params.module_ranks(targets)
    dense = sum(ranks[t.name] * rank_cost(t) for t in targets)
    pruned = sum(prune_counts(params, targets).values())
    return ParamCounts(final=dense, peak=dense, nonzero=dense - pruned)


class PRILoRA(Method):
    name = "prilora"
    Params = PRILoRAParams
    description = "PRILoRA (Benedek & Wolf): LoRA ranks increasing with depth + ongoing |A|·‖x‖ pruning of A"

    def __init__(self, params: PRILoRAParams | None = None):
        super().__init__(params)
        self.layers: dict[str, PRILoRALinear] = {}
        self.layer_index: dict[str, int | None] = {}
        self.counts: dict[str, int] = {}  #: entries pruned per module at an event (``prune_b`` uses them)
        self.events = 0  #: pruning events so far (the final one included)
        self.first_event_step = 0
        self.generator: torch.Generator | None = None  #: ``random`` criterion
        #: permanent mode: keep-mask (1 kept, 0 pruned) of every module's pruned matrix
        self.keep: dict[str, torch.Tensor] = {}
        self._masked: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (tensors, their masks)

    # --- budget -----------------------------------------------------------------------------------------

    @hookimpl
    def peftbench_count_trainable(self, targets):
        return _counts(self.params, targets)

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        """The mean rank whose (exactly summing) schedule is closest to ``target`` parameters."""
        if isinstance(self.params.schedule, list):
            return self.params  # used as given; the host reports a miss
        num_layers = targets[0].num_layers
        per_rank_unit = rank_cost(targets) / num_layers  # mean layer cost
        guess = round(target / per_rank_unit)  # total rank units over all layers
        candidates = [self.with_params(r=units / num_layers)
                      for units in range(max(num_layers, guess - 2), max(num_layers, guess + 2) + 1)]
        return min(candidates, key=lambda p: abs(_counts(p, targets).final - target))

    def describe(self, targets) -> Description:
        """Per-layer scale ``alpha_l / r_l`` (first → last layer) and the switches departing from the paper
        or the notes; ``scaling`` is always listed: the paper does not state a per-layer scale rule."""
        p = self.params
        ranks = p.module_ranks(targets)
        mean_rank = sum(ranks.values()) / len(ranks)
        by_layer = {t.layer: ranks[t.name] for t in targets if t.layer is not None}
        layer_ranks = [by_layer[i] for i in sorted(by_layer)] or sorted(set(ranks.values()))
        return Description(scale_range([p.alpha_for(r, mean_rank) / r for r in layer_ranks]),
                           departures(p, REFERENCE, open_choices=["scaling"]))

    # --- training ---------------------------------------------------------------------------------------

    @hookimpl
    def peftbench_inject(self, model: nn.Module, targets: list[TargetModule]):
        p = self.params
        ranks = p.module_ranks(targets)
        mean_rank = sum(ranks.values()) / len(ranks)
        statistic = {"input_norm": "input", "prune_b": "rank"}.get(p.criterion, "none")
        self.layer_index = {t.name: t.layer for t in targets}
        self.counts = prune_counts(p, targets)
        self.layers = inject_lora(model, targets, lambda t: ranks[t.name],
                                  lambda t: p.alpha_for(ranks[t.name], mean_rank), p.dropout,
                                  layer_cls=PRILoRALinear, statistic=statistic, ema=p.ema,
                                  input_norms=InputNorms())  # one per model: q, k, v share their input's norms
        return True

    @hookimpl
    def peftbench_train_start(self, state: TrainState):
        self.first_event_step = math.ceil(self.params.prune_start * state.total_steps)
        self.generator = torch.Generator().manual_seed(state.seed)

    @hookimpl
    def peftbench_after_optimizer_step(self, state: TrainState):
        if self.keep:  # permanent mask in force; later events would pick the same entries
            self.apply_masks(state.optimizer)
            return
        done = state.step + 1
        if (self.params.criterion != "none" and done >= self.first_event_step
                and done % self.params.prune_every == 0):
            self.prune(state.optimizer)

    @hookimpl
    def peftbench_train_end(self, state: TrainState):
        if self.params.criterion != "none" and not self.keep:
            self.prune(state.optimizer)  # the final event: the reported sparsity

    @hookimpl
    def peftbench_before_evaluate(self):
        """Every evaluation sees the pruned adapter (the reported size): zero what an event would prune now,
        and give it back after the evaluation, so that training goes on exactly as without one. After the
        final event the same entries are already zero, so the final evaluation is unchanged."""
        if self.params.criterion == "none" or self.keep:  # nothing pruned, or a permanent mask already applied
            return None
        generator = self.generator.get_state() if self.generator is not None else None
        zeroed = self._zero_prunable()
        if generator is not None:
            self.generator.set_state(generator)  # the `random` criterion: training draws what it would have

        @torch.no_grad()
        def restore():
            for weight, drop, values in zeroed:
                weight[drop] = values
        return restore

    @torch.no_grad()
    def _zero_prunable(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Zero, in every module, the entries a pruning event would zero now; returns them to restore."""
        p, zeroed = self.params, []
        if p.criterion in ("input_norm", "prune_b"):
            sync_statistics(self.layers.values())
        for name, layer in self.layers.items():
            weight = self.pruned_weight(layer)
            drop = prune_mask(importance(p.criterion, weight, layer.norm_ema, self.generator), p.prune_ratio,
                              p.grouping, self.counts[name] if p.criterion == "prune_b" else None)
            zeroed.append((weight, drop, weight[drop]))
            weight.masked_fill_(drop, 0.0)
        return zeroed

    def pruned_weight(self, layer: PRILoRALinear) -> nn.Parameter:
        return layer.lora_B if self.params.criterion == "prune_b" else layer.lora_A

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One pruning event over every module (one top-k per module)."""
        p = self.params
        for name, (weight, drop, _) in zip(self.layers, self._zero_prunable()):
            if p.permanent:
                self.keep[name] = (~drop).to(weight.dtype)
        self.events += 1
        if p.permanent:
            self._masked = None
            self.apply_masks(optimizer)  # zeroes the pruned entries' optimizer state too

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Permanent mode: zero the masked entries of the weights and of their optimizer state (Adam's moments:
        momentum cannot revive an entry), in one batched multiply."""
        if self._masked is None:  # built once; rebuilt after an event or a resume (new state tensors)
            tensors, masks, complete = [], [], optimizer is not None
            for name, keep in self.keep.items():
                weight = self.pruned_weight(self.layers[name])
                state = optimizer.state.get(weight) if optimizer is not None else None
                complete = complete and bool(state)
                for tensor in [weight, *(v for v in (state or {}).values()
                                         if torch.is_tensor(v) and v.shape == weight.shape)]:
                    tensors.append(tensor)
                    masks.append(keep)
            if not complete:  # no optimizer state yet: apply to what exists, collect the rest next time
                torch._foreach_mul_(tensors, masks)
                return
            self._masked = (tensors, masks)
        torch._foreach_mul_(*self._masked)

    @hookimpl
    def peftbench_state_dict(self):
        return {"prilora": {
            "events": self.events,
            "ema_started": {name: layer.ema_started for name, layer in self.layers.items()},
            "generator": self.generator.get_state() if self.generator is not None else None,
            "keep": self.keep,
        }}

    @hookimpl
    def peftbench_load_state_dict(self, state_dict):
        saved = state_dict["prilora"]
        self.events = saved["events"]
        for name, layer in self.layers.items():
            layer.ema_started = saved["ema_started"][name]  # norm_ema itself is a buffer: the host restores it
        if saved["generator"] is not None and self.generator is not None:
            self.generator.set_state(saved["generator"])
        self.keep = {name: keep.to(self.pruned_weight(self.layers[name]).device)
                     for name, keep in saved["keep"].items()}
        self._masked = None  # the optimizer's state tensors are replaced by the host's load

    # --- results ----------------------------------------------------------------------------------------

    @hookimpl
    def peftbench_report(self):
        layers = self.layers
        a = [m.lora_A.detach() for m in layers.values()]
        b = [m.lora_B.detach() for m in layers.values()]
        numel_a, numel_b = sum(t.numel() for t in a), sum(t.numel() for t in b)
        nonzero_a = sum(int(torch.count_nonzero(t)) for t in a)
        nonzero_b = sum(int(torch.count_nonzero(t)) for t in b)
        dense = numel_a + numel_b
        ranks = {name: m.r for name, m in layers.items()}
        by_layer = {self.layer_index[name]: rank for name, rank in ranks.items()
                    if self.layer_index.get(name) is not None}
        return {
            "ranks": ranks,
            "layer_ranks": [by_layer[i] for i in sorted(by_layer)],
            "counts": {"final": dense, "peak": dense, "nonzero": nonzero_a + nonzero_b},
            "sparsity": 1 - (nonzero_a + nonzero_b) / dense if dense else 0.0,
            "sparsity_A": 1 - nonzero_a / numel_a if numel_a else 0.0,
            "sparsity_B": 1 - nonzero_b / numel_b if numel_b else 0.0,
            "nonzero_A": nonzero_a, "numel_A": numel_a, "nonzero_B": nonzero_b, "numel_B": numel_b,
            "prune_events": self.events,
        }

    @hookimpl
    def peftbench_export_peft(self, model: nn.Module, targets: list[TargetModule]):
        """LoRA format through the toolkit's exporter (per-layer ranks and scales), pruned zeros kept in A."""
        layers = {t.name: model.get_submodule(t.name) for t in targets}
        if not all(isinstance(m, PRILoRALinear) for m in layers.values()):
            return None
        return lora_peft_export({name: (m.lora_A, m.lora_B, m.scaling) for name, m in layers.items()})


@hookimpl
def peftbench_add_methods():
    return [PRILoRA]
