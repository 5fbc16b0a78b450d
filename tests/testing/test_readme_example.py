"""The README section "Test your own protocol": the suite catches the toy protocol it shows when its
pads do not cancel or its client answers any request.

README_EXAMPLE is that README block (tests/test_readme.py runs it as written); the variants below
subclass its classes.
"""

import numpy as np
import pytest

from securefed.testing import ConformanceError, check_protocol
from tests.test_readme import BLOCKS

README_EXAMPLE = next(block for block in BLOCKS if "class PadSum" in block)


def toy():
    """The README's classes, without its final check_protocol call."""
    namespace = {"__name__": "readme_toy"}
    exec(compile(README_EXAMPLE.split("\n# One call runs")[0], "README example", "exec"), namespace)
    return namespace


def test_pads_that_do_not_cancel_are_caught():
    ns = toy()

    class SameSign(ns["PadClient"]):
        def set_input(self, x):
            y = np.round(x * ns["SCALE"]).astype(np.int64).view(np.uint64)
            for j in range(self.spec.n):
                if j != self.me:
                    y = y + ns["pad"](self.key, self.spec.session_id, min(self.me, j), max(self.me, j), self.spec.dim)
            self.y = y

    class Broken(ns["PadSum"]):
        def client(self, spec, client, x=None, *, rng):
            return SameSign(self.key, spec, client, x)

    with pytest.raises(ConformanceError) as info:
        check_protocol(Broken, clients=(1, 4), dimension=(1, 4), max_examples=20, properties=["correctness"])
    assert info.value.property == "correctness" and "counterexample" in str(info.value)


def test_a_client_that_answers_any_request_is_caught():
    ns = toy()

    class Trusting(ns["PadClient"]):
        def handle(self, phase, request):  # no check that the request is this round's
            return self.spec.session_id + bytes(request[:0]) + super().handle(phase, self.spec.session_id)[32:]

    class Broken(ns["PadSum"]):
        def client(self, spec, client, x=None, *, rng):
            return Trusting(self.key, spec, client, x)

    with pytest.raises(ConformanceError) as info:
        check_protocol(Broken, clients=(1, 4), dimension=(1, 4), max_examples=40, properties=["honest_client"])
    assert info.value.property == "honest_client" and "answered a second, different request" in str(info.value)
