"""The kit as a package: optional hypothesis, the round driver's fidelity, the error it raises."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import securefed as sf
from securefed.protocols import BFV, CKKS, Plain, SecAgg, SecAggPlus
from securefed.testing import ConformanceError, _driver

BLOCK_HYPOTHESIS = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "hypothesis" or name.startswith("hypothesis."):
                raise ImportError("No module named 'hypothesis'")
            return None
    sys.meta_path.insert(0, Block())
""")


def run_python(code):
    return subprocess.run([sys.executable, "-c", BLOCK_HYPOTHESIS + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_securefed_and_the_kit_import_without_hypothesis():
    out = run_python("""
        import securefed, securefed.testing
        from securefed.testing import adversary, load_profile
        import numpy as np
        run = adversary.run_round(securefed.protocols.Plain(), [np.zeros(2)] * 2)
        print("ok", run.result[1])
    """)
    assert out.returncode == 0, out.stderr
    assert "ok (0, 1)" in out.stdout


@pytest.mark.parametrize("use", ["from securefed.testing import check_protocol",
                                 "import securefed.testing.strategies",
                                 "from securefed.testing import check_clipper",
                                 "securefed.testing.load_profile()"])
def test_hypothesis_based_parts_say_what_to_install(use):
    out = run_python(f"import securefed, securefed.testing\n{use}\n")
    assert out.returncode != 0
    assert "need" in out.stderr and "hypothesis: install the extra with pip install 'securefed[testing]'" in out.stderr


@pytest.mark.parametrize("protocol,dropouts", [
    (Plain(), {1: "upload"}),
    (SecAgg(), {1: "share_keys", 3: "unmasking"}),
    (SecAggPlus(adversary="active"), {0: "consistency_check"}),
    (CKKS(key_holder="clients"), {2: "upload"}),
    (BFV(value_range=1.0, key_holder="masked"), {1: "keys"}),
], ids=lambda p: getattr(p, "name", ""))
def test_the_driver_runs_rounds_as_simulate_aggregation_does(protocol, dropouts):
    """The message properties compare rounds run by the kit's driver; unaltered, it must be simulate_aggregation."""
    xs = [np.linspace(-0.5, 0.5, 3) * (i + 1) / 6 for i in range(6)]
    res = sf.simulate_aggregation(protocol, xs, dropouts, seed=4)
    run = _driver.run(protocol, xs, dropouts=dropouts, seed=4)
    assert run.aborted is None and run.result[1] == res.included
    np.testing.assert_allclose(run.result[0], res.total, rtol=0, atol=1e-12)
    assert {c: (r.phase, r.reason) for c, r in run.dropped.items()} == \
        {c: (r.phase, r.reason) for c, r in res.dropped.items()}
    assert [(p, ph) for p, ph, _ in run.replies] == [(p, ph) for p, ph, _ in res.server_view.messages]
    if protocol.name.startswith("secagg") or protocol.name == "plain":  # HE draws its own randomness
        assert run.replies == res.server_view.messages


def test_a_conformance_error_is_an_assertion_error_naming_its_property():
    err = ConformanceError("abort", "X violates 'abort': ...")
    assert isinstance(err, AssertionError) and err.property == "abort"
