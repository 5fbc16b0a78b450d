"""The README section "Test your own protocol": the suite catches the toy protocol it shows when its
pads do not cancel or its client answers any request.

README_EXAMPLE is the text of that README block, verbatim; tests/test_readme.py runs it as written.
"""

import pathlib

import numpy as np
import pytest

from securefed.testing import ConformanceError, check_protocol

README_EXAMPLE = '''\
import hashlib
import struct

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, InvalidInput, MessageRejected, ProtocolAborted
from securefed.protocols import AggregationProtocol, ClientProtocol, DropReason, DropRecord, ServerProtocol
from securefed.testing import check_protocol

SCALE = 2.0**20  # fixed point: inputs in [-1, 1] become integers mod 2^64


def pad(key, session, i, j, dim):
    """The mask clients i < j share: AES-CTR keyed from a key the server does not have."""
    seed = hashlib.sha256(key + session + struct.pack(">II", i, j)).digest()
    return RandomSource(seed).fill(np.empty(dim, dtype=np.uint64))


class PadClient(ClientProtocol):
    def __init__(self, key, spec, me, x):
        self.key, self.spec, self.me = key, spec, me
        if x is not None:
            self.set_input(x)

    def set_input(self, x):
        if not np.isfinite(x).all() or np.abs(x).max() > 1:
            raise InvalidInput("inputs must be finite and in [-1, 1]")
        y = np.round(x * SCALE).astype(np.int64).view(np.uint64)
        for j in range(self.spec.n):  # +pad towards higher ids, -pad towards lower: they cancel in the sum
            if j != self.me:
                m = pad(self.key, self.spec.session_id, min(self.me, j), max(self.me, j), self.spec.dim)
                y = y + m if self.me < j else y - m
        self.y = y

    def handle(self, phase, request):
        if request != self.spec.session_id:
            raise MessageRejected("invalid message")
        return self.spec.session_id + struct.pack(">I", self.me) + self.y.tobytes()


class PadServer(ServerProtocol):
    def __init__(self, spec):
        self.spec, self.acc, self.got, self._dropped = spec, np.zeros(spec.dim, dtype=np.uint64), set(), {}

    @property
    def dropped(self):
        return self._dropped

    def requests(self, phase):
        return {i: self.spec.session_id for i in range(self.spec.n)}

    def receive(self, phase, party, payload):
        head = self.spec.session_id + struct.pack(">I", party)
        if (party in self.got or party in self._dropped or payload[: len(head)] != head
                or len(payload) != len(head) + 8 * self.spec.dim):
            if party not in self.got:  # a duplicate does not undo the accepted upload
                self._dropped.setdefault(party, DropRecord(phase, DropReason.REJECTED))
            raise MessageRejected("invalid message")
        self.acc += np.frombuffer(payload[len(head) :], dtype=np.uint64)  # checked first, then added
        self.got.add(party)

    def finish_phase(self, phase):
        for i in set(range(self.spec.n)) - self.got:
            self._dropped.setdefault(i, DropRecord(phase, DropReason.NO_REPLY))
        if len(self.got) < self.spec.n:
            raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS, "a client dropped: its pads cannot be removed")

    def result(self):
        return self.acc.view(np.int64) / SCALE, tuple(range(self.spec.n))


class PadSum(AggregationProtocol):
    """A toy: pairwise pads from a key all clients share; no dropout recovery, so everyone must stay."""

    name, phases, value_range = "padsum", ("upload",), 1.0

    def __init__(self, key=b"a key the server never sees...."):
        self.key = key

    def server(self, spec, *, rng):
        return PadServer(spec)

    def client(self, spec, client, x=None, *, rng):
        return PadClient(self.key, spec, client, x)

    def min_survivors(self, n):
        return n

    def error_bound(self, n):
        return n / SCALE  # rounding to 2^-20


# One call runs every property; in a pytest suite, `TestPadSum = conformance_tests(PadSum, clients=(1, 4))`
# gives one test per property instead.
check_protocol(PadSum, clients=(1, 4), dimension=(1, 4), max_examples=20)
'''


def test_the_readme_shows_this_example_verbatim():
    """tests/test_readme.py runs every python block of the README; this keeps the variants below in step."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert README_EXAMPLE in readme


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
