"""What a plugin author adds to their own test suite: peftbench's conformance kit on their method."""

from peftbench.testing import MethodConformance, check_method


class TestDoRAConformance(MethodConformance):
    """One pytest test per check of the kit, on the tiny model of peftbench.testing (seconds)."""

    method = "dora"  # registered through this package's entry point (pip install -e .)
    params = {"alpha": 8}


def test_dora_conforms_with_dropout_and_uniform_budget_ranks():
    check_method("dora", {"dropout": 0.1, "budget_ranks": "uniform"}, tolerance=0.15)
