"""Full fine-tuning: the reference every PEFT method is compared against (every weight trains).

Not budget-matched; its count is every parameter outside the head (the head is counted apart for all).
"""

from __future__ import annotations

from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.method import Method

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"


def _outside_head(model, head):
    return sum(p.numel() for name, p in model.named_parameters()
               if not any(name.startswith(h + ".") for h in head))


class FullFineTuning(Method):
    name = "full"
    description = "Full fine-tuning (reference; not budget-matched)"
    matches_budget = False

    @hookimpl
    def peftbench_count_trainable(self, model, head):
        n = _outside_head(model, head)
        return ParamCounts(final=n, peak=n, nonzero=n)

    @hookimpl
    def peftbench_inject(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return True


@hookimpl
def peftbench_add_methods():
    return [FullFineTuning]
