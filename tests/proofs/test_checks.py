"""Run every executable check of the arithmetic lemmas in proofs/checks/ (see proofs/*.md)."""

import inspect

import pytest

from tests.proofs._load import CHECKS, load_check

CASES = [
    (path.stem, name)
    for path in sorted(CHECKS.glob("*.py"))
    for name, fn in inspect.getmembers(load_check(path.stem), inspect.isfunction)
    if name.startswith("check_") and fn.__module__ == f"proofs_checks_{path.stem}"
]


def test_the_checks_are_found():
    names = {f"{m}.{f}" for m, f in CASES}
    assert {"secagg_masks.check_mask_cancellation_every_dropout_set",
            "secagg_thresholds.check_complete_graph_thresholds_every_n",
            "secagg_harary.check_finder_meets_the_conditions_exactly"} <= names


@pytest.mark.parametrize("module,check", CASES, ids=[f"{m}.{f}" for m, f in CASES])
def test_proof_check(module, check):
    getattr(load_check(module), check)()
