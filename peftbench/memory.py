"""Peak training memory: predicted before a sweep starts (``peftbench budget --memory GPU_GB``), and measured.

**Prediction** (:func:`predict`), in bytes, for one optimizer step of one run:

* ``params``: every weight in fp32 (the trainer loads models in fp32; mixed precision keeps fp32 master
  weights), plus, under bf16/fp16 autocast, a half-precision copy of every matmul weight (autocast casts
  each weight per forward and autograd keeps the copy for the backward; embeddings are not cast);
* ``grads``: one fp32 gradient per trainable parameter; ``optimizer``: AdamW's two fp32 moments per
  trainable parameter. Trainable = the method's peak adapter count (:class:`~peftbench.hookspecs.ParamCounts`
  ``peak``) + the classification head;
* ``activations``: what autograd saves for the backward, a per-layer transformer estimate after Korthikanti
  et al. (2022), "Reducing Activation Recomputation in Large Transformer Models", ``s·b·h·(34 + 5·a·s/h)``
  bytes per layer in half precision with a 4h MLP, written here for any element size ``e`` (4 in fp32, 2
  under autocast), MLP width ``I``, dropout and its mask size ``m`` (1 byte on CUDA; on the CPU dropout keeps
  a float multiplier, ``e`` bytes): per layer and token ``(8e + 2m·[dropout])·h + 2e·I`` for the inputs of
  the projections, GELU and layer norms, plus ``(e + [attention dropout]·(e + m))·a·s`` for the attention
  probabilities of an eager attention; SDPA kernels keep no ``s × s`` tensor. DeBERTa-v2/v3's disentangled
  attention keeps more, derived from transformers' ``DisentangledSelfAttention`` (:func:`relative_bytes`):
  ``torch.gather``'s backward keeps the c2p and p2c scores it gathers from, ``b·a × s × 2k`` each (``k`` =
  ``position_buckets``, 256 for DeBERTaV3: wider than most GLUE batches are long), and the positional keys
  and queries are repeated per sequence. Plus the embeddings' output.

Assumptions: every method saves the same activations (adapters on the attention and MLP projections keep
the inputs a frozen projection would not); batches as long as the longest one the data produces (``s``);
no gradient checkpointing; allocator slack, fragmentation and short-lived temporaries (the backward's
activation gradients, the logits) left out: on a GPU expect a few hundred MiB to ~10 % more.

**Measured margins** (tests/test_memory.py, CPU, fp32, one training step, every batch padded, against
:class:`TrainMemoryProbe`): prediction / measured total at batch 8 × 64 0.95 (LoRA) and 0.98 (full) on the
tiny model (activations alone 0.81-0.85: layer-norm statistics of a width-32 model), 1.00 and 1.00 on
MiniLM (also at 4 × 256). DeBERTa-v3 (its built-in config, 12 heads, 256 buckets, c2p|p2c): narrowed to
width 96 and 2 layers, 1.01 / 1.00 at 8 × 64, 1.00 / 1.00 at 4 × 256 and 2 × 320; at full width (12
layers, 768) at 2 × 320, 1.01 (LoRA) and 1.00 (full). Before the disentangled terms were derived the
DeBERTa prediction was 0.39-0.78 of the measured total. The tests allow ±30 %. bf16 on the CPU is not
representative of a GPU.

**Measurement** (:class:`TrainMemoryProbe`): the benchmarks' account of what a CPU run holds (on a GPU,
``torch.cuda.max_memory_allocated`` measures it directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .assembly import resolve_precision
from .hookspecs import hookimpl

GIB = 2 ** 30


@dataclass
class Dims:
    """The shapes the activation estimate needs, read from a (meta) model's config."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    dropout: bool  #: hidden dropout on (a mask per element kept)
    attention_dropout: bool
    score_tensors: int  #: ``s × s`` attention probabilities kept per head: 0 (SDPA kernel) or 1 (eager)
    #: CPU dropout keeps its mask in the activation dtype (a float multiplier); CUDA's fused kernel a 1-byte mask
    float_masks: bool = False
    #: DeBERTa's disentangled attention: relative-position rows attended over (``2 × position_buckets``, or
    #: ``2 × max_relative_positions`` without buckets), and how many of c2p / p2c use them
    relative_span: int = 0
    relative_terms: int = 0

    @classmethod
    def of(cls, model: Any, device: str = "cuda") -> Dims:
        c = model.config
        relative = bool(getattr(c, "relative_attention", False))
        eager = getattr(c, "_attn_implementation", "eager") in (None, "eager") or relative
        # SDPA with dropout on the CPU runs the math path, which keeps the scores like eager attention
        math_path = device == "cpu" and c.attention_probs_dropout_prob > 0
        span, terms = 0, 0
        if relative:
            buckets = getattr(c, "position_buckets", -1)
            max_relative = getattr(c, "max_relative_positions", -1)
            max_relative = max_relative if max_relative >= 1 else c.max_position_embeddings
            span = 2 * (buckets if buckets > 0 else max_relative)
            terms = sum(t in (getattr(c, "pos_att_type", None) or ()) for t in ("c2p", "p2c"))
        return cls(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                   intermediate=c.intermediate_size, dropout=c.hidden_dropout_prob > 0,
                   attention_dropout=c.attention_probs_dropout_prob > 0, score_tensors=int(eager or math_path),
                   float_masks=device == "cpu", relative_span=span, relative_terms=terms)


@dataclass
class Estimate:
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def activation_bytes(dims: Dims, batch: int, seq: int, element: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward of one micro-batch of ``batch × seq`` tokens (see the module
    docstring). With gradient checkpointing a layer keeps only its input; one layer at a time is recomputed
    with everything it saves."""
    h, e, a = dims.hidden, element, dims.heads
    mask = e if dims.float_masks else 1
    per_token = (8 * e + 2 * mask * dims.dropout) * h + 2 * e * dims.intermediate
    # the probabilities, and with dropout its mask and output
    per_token += dims.score_tensors * (e + dims.attention_dropout * (e + mask)) * a * seq
    layer = batch * seq * per_token + relative_bytes(dims, batch, seq, e, mask)
    embeddings = (e + mask * dims.dropout) * h
    layers = dims.layers * e * h * batch * seq + layer if checkpointing else dims.layers * layer
    return layers + batch * seq * embeddings


def relative_bytes(dims: Dims, batch: int, seq: int, e: int, mask: int) -> int:
    """What one layer of DeBERTa-v2/v3's disentangled attention keeps on top of an eager attention (transformers'
    ``DisentangledSelfAttention``, ``k`` = ``relative_span`` rows, ``n`` = ``relative_terms``): for each of c2p
    and p2c the ``b·a × s × k`` scores before ``torch.gather`` (its backward keeps its input: the dominant
    term, ``k`` = 512 for DeBERTaV3) with the ``s × s`` int64 gather index, and the positional keys / queries
    repeated per sequence (``b·a × k × h/a``); the scaled key copy (``b·s·h``), the boolean ``b × s × s`` mask
    of ``masked_fill``; and the relative embeddings' input to the projections with its dropout mask."""
    k, n, h = dims.relative_span, dims.relative_terms, dims.hidden
    if not k:
        return 0
    scores = n * (e * dims.heads * k * batch * seq + 8 * seq * seq)
    positional = n * e * batch * k * h
    return scores + positional + batch * seq * (e * h + seq) + k * h * (e + mask * dims.dropout)


def predict(model: Any, trainable: int, batch: int, seq: int, precision: str, device: str = "cuda",
            checkpointing: bool = False) -> Estimate:
    """Peak training memory of a run of ``model`` (a meta model: shapes only) training ``trainable``
    parameters at ``batch × seq`` tokens per micro-batch; ``precision``: fp32, bf16 or fp16."""
    half = precision in ("bf16", "fp16")
    total = sum(p.numel() for p in model.parameters())
    embedded = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params = 4 * total + (2 * (total - embedded) if half else 0)
    return Estimate(params=params, grads=4 * trainable, optimizer=8 * trainable,
                    activations=activation_bytes(Dims.of(model, device), batch, seq, 2 if half else 4,
                                                 checkpointing))


def longest_batches(config: Any, host: Any, tasks: list[str]) -> tuple[dict[str, int], list[str]]:
    """The longest training sequence of every task (the collator pads a batch to its longest example), capped
    by ``train.max_length``; ``None`` for a task whose data or tokenizer is not available. Also the notes."""
    from .config import data_dir_for
    from .modeling import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.model)
    except Exception as exc:  # offline, gated, missing backend: plan from max_length
        return {task: None for task in tasks}, [f"tokenizer not available ({type(exc).__name__}): every batch "
                                                "taken as long as train.max_length"]
    longest, missing = {}, []
    for task in tasks:
        cap = max(config.train_for(m, task).max_length for m in config.methods)
        try:
            data = host.task(task).encode_train(data_dir_for(config), tokenizer, cap)  # as the trainer does
            longest[task] = int(data.lengths.max())
        except Exception:  # no data here: plan from max_length
            longest[task] = None
            missing.append(task)
    notes = [f"no training data for {', '.join(missing)}: batches taken as long as train.max_length"] if missing else []
    return longest, notes


def plan(config: Any, solved: dict, shapes: Any, longest: dict[str, int | None],
         gpu_gb: float) -> list[list[str]]:
    """One row per (method label, task): the predicted peak, whether it fits ``gpu_gb`` GiB (what a \"24 GB\"
    card holds), and for a run that does not, a hint."""
    head = sum(p.numel() for n, p in shapes.model.named_parameters()
               if any(n == h or n.startswith(h + ".") for h in shapes.head))
    capacity = gpu_gb * GIB
    rows = []
    for method in config.methods:
        for task in config.tasks:
            train = config.train_for(method, task)
            precision = resolve_precision(train.precision, config.model.dtype, bf16_gpu=True)  # on a bf16 GPU
            seq = train.max_length if train.pad_to_max_length or not longest.get(task) else \
                min(longest[task], train.max_length)
            trainable = solved[(method.label, task)].counts.peak + head
            est = predict(shapes.model, trainable, train.batch_size, seq, precision,
                          checkpointing=train.gradient_checkpointing)
            fits = est.total <= capacity
            rows.append([method.label, task, f"{train.batch_size} × {seq}", precision, f"{est.total / GIB:.1f}",
                         f"{est.activations / GIB:.1f}", "yes" if fits else "NO",
                         "" if fits else hint(est, train, capacity)])
    return rows


def hint(est: Estimate, train: Any, capacity: float) -> str:
    """What would bring a run under ``capacity`` bytes: activations shrink with the micro-batch."""
    fixed = est.total - est.activations
    if fixed >= capacity:
        return "weights, gradients and optimizer state alone do not fit: a larger GPU or fewer trainable parameters"
    factor = 2
    while factor < train.batch_size and fixed + est.activations / factor > capacity:
        factor *= 2
    tips = [f"batch_size {max(1, train.batch_size // factor)} with grad_accum {train.grad_accum * factor}"]
    if not train.gradient_checkpointing:
        tips.append("train.gradient_checkpointing: true")
    if train.precision == "fp32":
        tips.append("precision: bf16")
    return "; or ".join(tips)


MEMORY_HEADERS = ["method", "task", "batch × length", "precision", "peak GiB", "activations GiB", "fits", "hint"]


class TrainMemoryProbe:
    """Peak training memory of a CPU run, added up from what training holds (a run-hook observer).

    ``params`` (every weight, frozen or not) + ``grads`` (one per trainable parameter) + ``optimizer``
    (AdamW's moments, read from the optimizer at the end) + ``activations``: the largest total, over the
    training steps, of the distinct tensor storages autograd saved for backward during one step (recorded
    with ``torch.autograd.graph.saved_tensors_hooks``; parameters are counted once, under ``params``).
    It leaves out allocator slack and short-lived temporaries, which the methods share. The pack hook is a
    few Python operations per saved tensor: well under 1 % of a CPU step.
    """

    def __init__(self):
        self.result: dict[str, int] | None = None
        self._hooks = None
        self._handle = None

    @hookimpl
    def peftbench_train_start(self, model, state):
        self.model, self.optimizer = model, state.optimizer
        self._peak, self._saved, self._params = 0, {}, set()
        self._handle = model.register_forward_pre_hook(self._next_forward)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def _next_forward(self, module, args) -> None:
        self._peak = max(self._peak, sum(self._saved.values()))
        self._saved = {}
        # parameters can be replaced mid-run (PrunedLoRA shrinks A and B): refresh every step
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    @hookimpl
    def peftbench_train_end(self, model):
        self._next_forward(model, ())
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                        for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        self.result = {
            "params": sum(p.numel() * p.element_size() for p in model.parameters()),
            "grads": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer": optimizer,
            "activations": self._peak,
        }
        self.result["total"] = sum(self.result.values())
        self.close()

    def close(self) -> None:
        """Undo the hooks (also after a run that failed before ``train_end``)."""
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
