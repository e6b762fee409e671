"""The LoRA layer: ``y = W x + b + (alpha / r) · B A dropout(x)`` on a frozen ``nn.Linear``.

Kept deliberately plain so that other methods can build on it: PRILoRA masks entries of ``lora_A`` and
reads the input statistics, PrunedLoRA shrinks ``r`` in place, DoRA adds a magnitude. Initialisation follows
Hu et al. and HF PEFT (A Kaiming-uniform, B zero), so a fresh adapter leaves the model's output unchanged.
A layer loads a state dict of another rank by taking that rank (``peftbench_resizable``).

Speed (profiled on CPU; ``docs/benchmarks.md``): the textbook form ``base(x) + B(A(x)) · s`` that HF PEFT
runs costs two skinny GEMMs that write a full ``tokens × d`` tensor (``h Bᵀ`` forward, ``g_h A`` backward),
plus a multiply and an add over the layer's output each way. In exact fp32 this layer instead folds the
update into the weight for the two big GEMMs (:class:`MergedLoRAFunction`): ``y = x (W + s B A)ᵀ + b`` and
``∂L/∂x = g (W + s B A)``, and computes the adapter gradients from rank-``r`` products only. Same result up
to fp32 rounding, no extra pass over any ``tokens × d`` tensor, and less memory saved for backward than
PEFT's form (``x`` only, not ``A x``). Under autocast (bf16/fp16), TF32 matmuls or active dropout the delta
must stay unmerged (low-precision rounding of ``W + ΔW`` would swallow the small ``ΔW``); that path puts the
scale on the ``r`` channels and adds the update inside the GEMM (``addmm``). So ``train.tf32`` trades this
layer's merged path for TF32's faster big GEMMs: on a GPU with TF32 the unmerged form is the one that runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .resize import resize_rank


@torch.no_grad()
def merged_linear(base: nn.Linear, delta_weight: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` computing ``(W + delta_weight) x + b`` (an adapter folded into its base layer)."""
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    merged.weight.copy_(base.weight + delta_weight.to(base.weight.dtype))
    if base.bias is not None:
        merged.bias.copy_(base.bias)
    return merged


@torch.compiler.assume_constant_result
def full_precision_fp32_matmuls() -> bool:
    """Whether fp32 matmuls run at full precision (not TF32, ``train.tf32``). Under ``torch.compile`` this is read
    once while a graph is traced and kept in it as a constant: a call the compiler cannot trace (it returns a
    string) would break the graph at every adapter. Changing the precision recompiles (dynamo guards it)."""
    return torch.get_float32_matmul_precision() == "highest"


def recomputing() -> bool:
    """Whether this forward pass is activation checkpointing's recomputation during backward
    (``train.gradient_checkpointing``): statistics a layer collects in its forward must skip it, or every batch
    counts twice. (A forward inside the autograd engine is one; under ``torch.compile`` the recomputation runs
    uncompiled, so a traced forward never is.)"""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def merge_is_exact(x: torch.Tensor, weight: torch.Tensor, adapter: torch.Tensor, dropout: nn.Module,
                   training: bool) -> bool:
    """Whether a low-rank update may be folded into the weight for one forward pass: everything fp32 at full
    matmul precision (no rounding swallows the small update) and no dropout on the adapter's input in training
    (the merged product would apply it to the base path too)."""
    return (x.dtype == weight.dtype == adapter.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
            and full_precision_fp32_matmuls()
            and not (training and isinstance(dropout, nn.Dropout)))


def in_own_dtype(x: torch.Tensor, adapter: torch.Tensor) -> bool:
    """Whether an adapter computes in its own dtype: half-precision input (frozen bf16/fp16 weights), an fp32
    adapter and no autocast (``train.autocast: false``). Then, as PEFT's ``autocast_adapter_dtype`` does, the
    input is cast up, the update computed and added to the base output in fp32, the sum cast back."""
    return x.dtype != adapter.dtype and not torch.is_autocast_enabled(x.device.type)


class MergedLoRAFunction(torch.autograd.Function):
    """``x (W + s·B A)ᵀ + b`` with the gradients of ``x``, ``A``, ``B`` (and of ``W``, ``b`` if they train)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_b_lora, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:  # the merged weight is recomputed: cheaper than keeping a d_out × d_in copy per layer
            grad_x = (g @ torch.addmm(weight, lora_B, lora_A, alpha=s)).view(x.shape)
        if need_a or need_b_lora:
            # the skinny products in their fast layout: r × tokens results (A xᵀ rather than x Aᵀ), and
            # ∂B = s (hᵀ g)ᵀ rather than autograd's s gᵀ h, several times slower on CPU
            h_t = lora_A @ x2.t()  # (A x)ᵀ, recomputed: cheaper than saving it
            grad_b = (h_t @ g).t().mul_(s)
            grad_a = (lora_B.t() @ g.t()).mul_(s) @ x2
        if need_w:
            grad_w = g.t() @ x2
        if need_b:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


class LoRALinear(nn.Module):
    #: the host's protocol: a module marked so may be loaded from tensors of another shape and resizes itself
    #: (here: a saved adapter of another rank, e.g. one PrunedLoRA shrank during training)
    peftbench_resizable = True
    #: use the merged fp32 path where it is exact (see the module docstring); ``False`` forces the unmerged one
    merge_in_fp32 = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if r < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.alpha = alpha
        #: fixed at construction: methods that later shrink r keep the scale (alpha / initial r)
        self.scaling = scaling if scaling is not None else (alpha / r if r else 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.reset_parameters()

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def reset_parameters(self) -> None:
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def can_merge(self, x: torch.Tensor) -> bool:
        """Whether ``W + s·B A`` can stand in for the unmerged sum without losing the update to rounding."""
        return self.merge_in_fp32 and merge_is_exact(x, self.base.weight, self.lora_A, self.dropout, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0:
            return self.base(x)
        if self.can_merge(x):
            return MergedLoRAFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                            self.scaling)
        if in_own_dtype(x, self.lora_A):
            out = self.base(x)
            update = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)
            return (out + update * self.scaling).to(out.dtype)
        out = self.base(x)
        # the scale on the r channels (not the d_out-wide output), and the update added inside the GEMM
        h = F.linear(self.dropout(x), self.lora_A) * self.scaling
        return torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.t()).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into the weight (for export and inference)."""
        return merged_linear(self.base, self.delta_weight())

    def resize(self, r: int) -> None:
        """Give the adapter rank ``r`` in place (the same ``nn.Parameter`` objects, so an optimizer holding them
        stays valid): components beyond ``r`` are dropped, new ones are zero. The scaling is kept. For loading;
        during training, use :func:`~peftbench.lora.keep_rank` (see :mod:`peftbench.lora.resize`)."""
        resize_rank(self.lora_A, 0, r)
        resize_rank(self.lora_B, 1, r)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "lora_A")
        if saved is not None and saved.dim() == 2 and saved.shape[1] == self.in_features and saved.shape[0] != self.r:
            self.resize(saved.shape[0])  # then nn.Module copies the values; any other misfit fails there
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"
