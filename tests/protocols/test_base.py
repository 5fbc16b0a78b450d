import numpy as np
import pytest

import securefed as sf
from securefed.errors import ConfigurationError, InvalidInput
from securefed.protocols.base import RoundSpec


def test_dropout_schedule_is_validated():
    xs = [np.ones(2)] * 3
    with pytest.raises(InvalidInput, match="not a client index"):
        sf.simulate_aggregation(sf.protocols.Plain(), xs, dropouts={3: "upload"})
    with pytest.raises(InvalidInput, match="not one of"):
        sf.simulate_aggregation(sf.protocols.Plain(), xs, dropouts={0: "unmasking"})


def test_server_view_records_payloads_or_only_digests():
    xs = [np.arange(4.0), np.ones(4)]
    full = sf.simulate_aggregation(sf.protocols.Plain(), xs, seed=0)
    assert [(c, p) for c, p, _ in full.server_view.messages] == [(0, "upload"), (1, "upload")]
    assert full.server_view.messages[0][2].endswith(xs[0].tobytes())  # Plain: the server sees inputs
    digest = sf.simulate_aggregation(sf.protocols.Plain(), xs, seed=0, record="digest")
    assert digest.server_view.messages == []
    assert digest.server_view.digests == full.server_view.digests
    assert full.server_view.bytes_from(0) == len(full.server_view.messages[0][2])


def test_seed_fixes_the_session_and_a_2d_array_is_accepted():
    a = sf.simulate_aggregation(sf.protocols.Plain(), np.ones((3, 2)), seed=1)
    b = sf.simulate_aggregation(sf.protocols.Plain(), np.ones((3, 2)), seed=1)
    assert a.spec.session_id == b.spec.session_id
    assert a.server_view.digests == b.server_view.digests


@pytest.mark.parametrize("kwargs", [dict(n=0, dim=1), dict(n=1, dim=0)])
def test_round_spec_needs_clients_and_dimension(kwargs):
    with pytest.raises(InvalidInput):
        RoundSpec(session_id=bytes(32), **kwargs)


def test_round_spec_session_id_is_32_bytes():
    with pytest.raises(ConfigurationError):
        RoundSpec(n=1, dim=1, session_id=b"short")


def test_plain_carries_no_integer_encoding():
    with pytest.raises(ConfigurationError):
        sf.protocols.Plain().with_encoder(object())


def test_the_input_phase_is_the_declared_one_or_else_the_last():
    """One definition (base.md): simulate_aggregation, the audit verifier and Flower all use it."""

    class Unset(sf.protocols.Plain):
        phases = ("hello", "upload")
        input_phase = ""

    class Wrong(sf.protocols.Plain):
        input_phase = "nope"

    assert Unset.input_phase_index() == 1 and Unset().input_phase_index() == 1
    assert sf.protocols.Plain.input_phase == "upload" and sf.protocols.Plain().input_phase_index() == 0
    for cls in sf.protocols.REGISTRY.values():
        assert cls.phases[cls.input_phase_index()] == (cls.input_phase or cls.phases[-1])
    assert sf.protocols.SecAggPlus.phases[sf.protocols.SecAggPlus.input_phase_index()] == "masked_input"
    with pytest.raises(ConfigurationError, match="nope"):
        Wrong.input_phase_index()


def test_a_given_session_id_is_the_rounds():
    session = bytes(range(32))
    res = sf.simulate_aggregation(sf.protocols.Plain(), [np.ones(3)] * 2, seed=1, session_id=session)
    assert res.spec.session_id == session
    assert sf.simulate_aggregation(sf.protocols.Plain(), [np.ones(3)] * 2, seed=1).spec.session_id != session


@pytest.mark.parametrize("reason", ["no_reply", "timeout", None])
def test_a_drop_record_takes_only_a_drop_reason(reason):
    from securefed.protocols.base import DropReason, DropRecord

    with pytest.raises(TypeError, match="DropReason"):
        DropRecord("masked_input", reason)
    assert DropRecord("masked_input", DropReason.NO_REPLY).reason.value == "no_reply"
