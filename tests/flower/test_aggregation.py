"""One aggregation round over a Flower grid (in process): sums, dropouts, refusals, bad replies."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, ProtocolAborted
from securefed.flower import GridAggregator, _envelope
from securefed.flower.testing import InProcessGrid
from securefed.protocols.base import DropReason
from tests.flower import apps


def phase_of(msg):
    return msg.content["securefed"]["phase"]


def run_round(protocol, app, n, *, deliver=None, tamper=None, round_index=1, seed=0):
    grid = InProcessGrid(app, apps.nodes(n), deliver=deliver, tamper=tamper)
    return apps.run(apps.aggregator(protocol), grid, grid.get_node_ids(), round_index=round_index, seed=seed)


vectors = arrays(np.float32, apps.dim(), elements=st.floats(-1e3, 1e3, width=32)).map(lambda a: a.astype(np.float64))


@given(st.integers(1, 6).flatmap(lambda n: st.lists(vectors, min_size=n, max_size=n)), st.data())
def test_plain_round_sums_exactly_the_updates_of_the_nodes_that_stayed(updates, data):
    n = len(updates)
    protocol = sf.protocols.Plain()
    silent = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    first = 1001
    out = run_round(protocol, apps.client_app(protocol, dict(enumerate(updates))), n,
                    deliver=lambda node, msg: node - first not in silent)
    kept = [p for p in range(n) if p not in silent]
    assert out.included_nodes == tuple(first + p for p in kept)
    expected = np.zeros(apps.dim())
    for p in kept:
        expected += updates[p]
    np.testing.assert_array_equal(out.result.total, expected)
    dropped = {v - first: (d.phase, d.reason) for v, d in out.dropped_nodes.items()}
    assert dropped == dict.fromkeys(silent, ("upload", DropReason.NO_REPLY))


# The phase whose reply carries the input: a node that drops after it is still in the sum.
CONTRIBUTES = {"plain": "upload", "secagg+": "masked_input"}


@pytest.mark.parametrize("protocol", [sf.protocols.Plain(), sf.protocols.SecAggPlus()], ids=lambda p: p.name)
@given(data=st.data())
def test_dropouts_at_any_phase_give_what_the_simulation_gives(protocol, data):
    """Who is included, and when the round aborts, match simulate_aggregation for the same dropouts."""
    n = data.draw(st.integers(3, 6))
    phases = protocol.phases
    drop_at = data.draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(phases), max_size=n))
    updates = {p: np.full(apps.dim(), (p + 1) / 16) for p in range(n)}

    def deliver(node, msg):
        p = node - 1001
        return p not in drop_at or phases.index(phase_of(msg)) < phases.index(drop_at[p])

    # The same session (the graph of SecAgg+ depends on it): Flower's binds the round's node ids.
    nonce = RandomSource(0).child("session").token_bytes(32)
    session = _envelope.session_id(nonce, _envelope.pack_nodes(list(apps.nodes(n))),
                                   bound=_envelope.binding(1, apps.dim(), 0, None, None))
    try:
        sim = sf.simulate_aggregation(protocol, [updates[p] for p in range(n)], dropouts=drop_at, seed=0,
                                      session_id=session)
    except ProtocolAborted:
        with pytest.raises(ProtocolAborted):
            run_round(protocol, apps.client_app(protocol, updates), n, deliver=deliver)
        return
    out = run_round(protocol, apps.client_app(protocol, updates), n, deliver=deliver)
    assert out.result.included == sim.included
    last = phases.index(CONTRIBUTES[protocol.name])
    assert set(out.result.included) == {p for p in range(n) if phases.index(drop_at.get(p, phases[-1])) > last
                                        or p not in drop_at}
    expected = sum(updates[p] for p in out.result.included)
    np.testing.assert_allclose(out.result.total, expected, rtol=0, atol=protocol.error_bound(n))
    assert {v - 1001: (d.phase, d.reason) for v, d in out.dropped_nodes.items()} == {
        c: (d.phase, d.reason) for c, d in sim.dropped.items()}


def test_a_node_whose_training_fails_is_a_refusing_dropout_and_the_round_goes_on():
    protocol = sf.protocols.Plain()
    app = apps.client_app(protocol, {p: np.full(apps.dim(), p + 1.0) for p in range(3)}, fail=lambda p, r: p == 1)
    out = run_round(protocol, app, 3)
    assert out.included_nodes == (1001, 1003)
    assert out.dropped_nodes[1002].reason is DropReason.REFUSED
    np.testing.assert_array_equal(out.result.total, np.full(apps.dim(), 4.0))


def test_nodes_refuse_a_server_that_asks_for_another_protocol():
    """The node takes its protocol from its own configuration, never from the server."""
    class Other(sf.protocols.Plain):
        def describe(self, n):
            return {**super().describe(n), "value_bits": 8}

    app = apps.client_app(sf.protocols.Plain(), {p: np.ones(apps.dim()) for p in range(2)})
    with pytest.raises(ProtocolAborted):  # every node refuses: nothing to aggregate
        run_round(Other(), app, 2)
    assert _envelope.describe(Other(), 2) != _envelope.describe(sf.protocols.Plain(), 2)


def test_all_nodes_silent_aborts_and_auxiliary_parties_are_refused_clearly():
    protocol = sf.protocols.Plain()
    app = apps.client_app(protocol, {p: np.ones(apps.dim()) for p in range(2)})
    with pytest.raises(ProtocolAborted):
        run_round(protocol, app, 2, deliver=lambda node, msg: False)

    class WithDecryptor(sf.protocols.Plain):
        def server(self, spec, *, rng):
            inner = super().server(spec, rng=rng)

            class S(type(inner)):
                def requests(self, phase):
                    return {**super().requests(phase), "decryptor": b""}

            inner.__class__ = S
            return inner

    with pytest.raises(ConfigurationError, match="auxiliary"):
        run_round(WithDecryptor(), app, 2)


def test_nodes_train_in_the_phase_that_carries_the_input_as_the_verifier_and_simulation_say():
    """An unset input_phase means the last phase (base.md), on Flower too."""
    from securefed.flower.aggregation import message_type

    class Unset(sf.protocols.Plain):
        phases = ("hello", "upload")
        input_phase = ""

    assert message_type(Unset(), "upload") == "train" and message_type(Unset(), "hello") == "query.hello"
    for cls in sf.protocols.REGISTRY.values():
        phase = cls.phases[cls.input_phase_index()]
        assert message_type(cls, phase) == "train" and message_type(cls, phase, "decryptor") == f"query.{phase}"


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), "5"])
def test_timeouts_must_be_positive_finite_seconds(timeout):
    with pytest.raises(ConfigurationError):
        GridAggregator(sf.protocols.Plain(), phase_timeout=timeout)
