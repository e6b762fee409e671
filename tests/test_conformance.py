"""The conformance kit (``peftbench.testing``): every installed method passes it, and every check fails on a
method with the defect that check is for."""

from __future__ import annotations

import os

import pytest
import torch
from peftbench.plugins.lora import LoRA, LoRAParams

from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.host import Host
from peftbench.testing import CHECKS, Conformance, ConformanceError, MethodConformance, check_method

# Kit options per method: full fine-tuning trains the base on purpose; PrunedLoRA's default schedule (an event
# every 10 steps from rank 32) does not fit the kit's 12-step runs, so it prunes 8 → 4 spread over the window.
KIT_OPTIONS = {
    "full": {"trains_base": True},
    "prunedlora": {"params": {"r": 4, "init_ratio": 2, "prune_every": None}},
}


def installed_methods() -> list[str]:
    """Every method registered through an entry point (built-ins and installed third-party plugins).

    Benchmark-only methods (``benchmarks.peft_baselines``) are loaded with ``plugins:`` and never appear here; the
    PEFT bridge's tuners run the kit in tests/test_peft_bridge.py, with their sizes cut to the kit's tiny model.
    """
    host = Host()
    return sorted(name for name, reg in host.methods.items()
                  if reg.plugin.source == "entry point" and not reg.obj.__module__.startswith("benchmarks.")
                  and reg.obj.__module__ != "peftbench.plugins.peft")


@pytest.mark.parametrize("name", installed_methods())
def test_installed_method_passes_the_conformance_kit(name):
    options = dict(KIT_OPTIONS.get(name, {}))
    check_method(name, options.pop("params", None), **options)


def test_builtins_and_the_example_are_among_the_checked_methods():
    names = installed_methods()
    assert {"lora", "full"} <= set(names)
    if _dora_installed():
        assert "dora" in names


def _dora_installed() -> bool:
    try:
        import peftbench_dora  # noqa: F401
    except ImportError:
        return False
    return True


class TestLoRAThroughTheClassAPI(MethodConformance):
    """The pytest-class form of the kit, as a plugin author uses it (one test per check)."""

    method = "lora"
    params = {"r": 2, "alpha": 4}


def test_the_class_api_has_one_test_per_check():
    tests = sorted(n for n in dir(MethodConformance) if n.startswith("test_"))
    assert len(tests) == len(CHECKS)


# ---------------------------------------------------------------------------------------------------------
# Deliberately broken methods: each check must catch its defect (and name it)
# ---------------------------------------------------------------------------------------------------------


def _fails(method, check, *fragments, params=None, **options) -> str:
    with pytest.raises(ConformanceError) as info:
        Conformance(method, params, **options).check([check])
    message = str(info.value)
    assert f"[{check}]" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


class TypoHook(LoRA):
    name = "typo_hook"

    @hookimpl
    def peftbench_train_strat(self, model, state):  # typo: never called
        pass


class WrongArgument(LoRA):
    name = "wrong_argument"

    @hookimpl
    def peftbench_train_end(self, model, stat):  # the hook passes `state`
        pass


class ForgotHookimpl(LoRA):
    name = "forgot_hookimpl"

    def peftbench_train_end(self, model, state):  # no @hookimpl: silently never called
        pass


class NoSolver(LoRA):
    name = "no_solver"
    peftbench_solve_budget = None  # budget-matched, but cannot solve


def test_hooks_check_catches_a_typo_in_a_hook_name():
    _fails(TypoHook, "hooks", "unknown hook 'peftbench_train_strat'")


def test_hooks_check_catches_wrong_argument_names():
    _fails(WrongArgument, "hooks", "Argument(s) {'stat'} are declared in the hookimpl but can not be found in the "
           "hookspec")


def test_hooks_check_catches_a_missing_hookimpl_marker():
    _fails(ForgotHookimpl, "hooks", "peftbench_train_end is not decorated with @hookimpl")


def test_hooks_check_catches_a_budget_matched_method_without_solver():
    _fails(NoSolver, "hooks", "peftbench_solve_budget is not implemented")


class UnfreezesBase(LoRA):
    name = "unfreezes_base"

    @hookimpl
    def peftbench_inject(self, model, targets):
        super().peftbench_inject(model, targets)
        model.get_submodule(targets[0].name).base.weight.requires_grad_(True)
        return True


class UnfreezesBaseLater(LoRA):
    name = "unfreezes_base_later"

    @hookimpl
    def peftbench_train_start(self, model, state):
        model.bert.embeddings.word_embeddings.weight.requires_grad_(True)


def test_frozen_base_check_catches_injection_that_unfreezes_a_base_weight():
    _fails(UnfreezesBase, "frozen_base", "after peftbench_inject 1 base parameter(s) are trainable",
           "attention.self.query.weight")


def test_frozen_base_check_catches_a_run_hook_that_unfreezes_the_base():
    _fails(UnfreezesBaseLater, "frozen_base", "after training", "word_embeddings.weight")


class Miscounts(LoRA):
    name = "miscounts"

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = self._count(targets) - sum(t.out_features for t in targets)  # forgot B
        return ParamCounts(final=n, peak=n, nonzero=n)


def test_counts_check_catches_a_count_that_disagrees_with_injection():
    _fails(Miscounts, "counts", "peftbench_inject made")


class IgnoresBudget(LoRA):
    name = "ignores_budget"

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        return self.params  # always r=8, whatever the target


class SolvesToDict(LoRA):
    name = "solves_to_dict"

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        return {"r": 4}


class SolverCountMismatch(LoRA):
    """Solves like LoRA but injects one rank more than the solved params say."""

    name = "solver_count_mismatch"

    @hookimpl
    def peftbench_inject(self, model, targets):
        from peftbench.plugins.lora import inject_lora

        inject_lora(model, targets, lambda t: self.params.r + (self.params.r == 4), lambda t: self.params.alpha)
        return True


def test_budget_check_catches_a_solver_that_misses_the_target():
    _fails(IgnoresBudget, "budget", "misses the target", "tolerance")


def test_budget_check_catches_a_solver_returning_the_wrong_type():
    _fails(SolvesToDict, "budget", "expected a LoRAParams")


def test_budget_check_catches_solved_params_that_inject_another_count():
    _fails(SolverCountMismatch, "budget", "with the solved params", "peftbench_inject made")


class HiddenState(LoRA):
    """Keeps a random per-layer scale as a plain attribute: not in any state dict, so lost on reload."""

    name = "hidden_state"

    @hookimpl
    def peftbench_inject(self, model, targets):
        super().peftbench_inject(model, targets)
        for target in targets:
            model.get_submodule(target.name).scaling = 1.0 + torch.rand(()).item()
        return True


def test_state_check_catches_state_outside_the_state_dict():
    _fails(HiddenState, "state", "outputs differ")


class UnpicklableState(LoRA):
    name = "unpicklable_state"

    @hookimpl
    def peftbench_state_dict(self):
        return {"unpicklable_state": {"when": object()}}

    @hookimpl
    def peftbench_load_state_dict(self, state_dict):
        pass


def test_state_check_catches_a_state_dict_that_weights_only_loading_refuses():
    _fails(UnpicklableState, "state", "torch.load(weights_only=True)")


class Nondeterministic(LoRA):
    """Adds noise from the OS's entropy pool after every step: no seed reproduces it."""

    name = "nondeterministic"

    @hookimpl
    def peftbench_after_optimizer_step(self, model):
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(1e-3 * torch.randn(p.shape, generator=generator))


def test_determinism_check_catches_an_unseeded_random_source():
    _fails(Nondeterministic, "determinism", "two runs with seed 0 differ")


class InjectReturnsNone(LoRA):
    name = "inject_returns_none"

    @hookimpl
    def peftbench_inject(self, model, targets):
        super().peftbench_inject(model, targets)  # and forgets `return True`


class TrainStartReturns(LoRA):
    name = "train_start_returns"

    @hookimpl
    def peftbench_train_start(self, model):
        return model


class ReportNotJson(LoRA):
    name = "report_not_json"

    @hookimpl
    def peftbench_report(self, model):
        return {"scale": torch.ones(2)}


class ReportWrongConvention(LoRA):
    name = "report_wrong_convention"

    @hookimpl
    def peftbench_report(self):
        return {"ranks": [8, 8, 8]}  # the convention is {module_name: rank}


class ExtraLossVector(LoRA):
    name = "extra_loss_vector"

    @hookimpl
    def peftbench_extra_loss(self, model):
        return torch.zeros(1, requires_grad=True)  # not a scalar: broadcasts silently


class ExportWrongShape(LoRA):
    name = "export_wrong_shape"

    @hookimpl
    def peftbench_export_peft(self, model, targets):
        return [{"peft_type": "LORA"}, {}]


class CountsWrongType(LoRA):
    name = "counts_wrong_type"

    @hookimpl
    def peftbench_count_trainable(self, targets):
        return self._count(targets)  # a bare int instead of ParamCounts


@pytest.mark.parametrize("method, fragment", [
    (InjectReturnsNone, "peftbench_inject returned None: expected True"),
    (TrainStartReturns, "peftbench_train_start returned"),
    (ReportNotJson, "expected JSON-serialisable values"),
    (ReportWrongConvention, "'ranks' must hold a dict"),
    (ExtraLossVector, "expected a scalar (0-dim) floating-point tensor"),
    (ExportWrongShape, "expected a tuple (adapter_config: dict, state_dict: dict)"),
    (CountsWrongType, "expected a peftbench.hookspecs.ParamCounts"),
], ids=lambda x: getattr(x, "name", None))
def test_return_types_check_catches_each_documented_type(method, fragment):
    _fails(method, "return_types", fragment)


def test_check_method_names_every_failed_check_and_is_an_assertion_error():
    with pytest.raises(AssertionError) as info:
        check_method(Miscounts, checks=["hooks", "counts", "return_types"])
    message = str(info.value)
    assert "failed 1 conformance check(s)" in message and "[counts]" in message


def test_a_good_subclass_passes_and_params_are_validated():
    class GoodLoRA(LoRA):
        name = "good_lora"

    check_method(GoodLoRA, {"r": 2}, checks=["hooks", "counts", "budget"])
    check_method(GoodLoRA, LoRAParams(r=3), checks=["counts"])
    _fails(GoodLoRA, "hooks", "cannot build LoRAParams", params={"rank": 2})


def test_unknown_check_names_are_rejected():
    with pytest.raises(ValueError, match="unknown check"):
        Conformance("lora").check(["speed"])


def test_an_unknown_method_name_fails_clearly():
    _fails("no_such_method", "counts", "method 'no_such_method' is not registered")
