"""Every protocol of securefed.protocols.REGISTRY, in each key-holder and adversary variant, passes the
conformance suite (securefed/testing/conformance.py), one pytest test per property group.

Example counts are set here because the rounds are expensive: a SecAgg round of up to 6 clients
costs tens of milliseconds, a TenSEAL round 0.2-1 s (so HE rounds keep to 3 clients, 3 coordinates
and 3 examples per property, 2 for the key-holder variants). Each test class runs its properties
with the same options.
"""

import numpy as np
import pytest

from securefed.errors import ConfigurationError
from securefed.protocols import BFV, CKKS, REGISTRY, Plain, SecAgg, SecAggPlus
from securefed.testing import ConformanceError, check_protocol, conformance_tests
from securefed.testing.conformance import _GROUPS


def survivors_at_least_t(protocol):
    """Complete-graph SecAgg: a round finishes whenever t clients never drop (proofs/secagg.md)."""

    def must_finish(n, dropouts):
        return n - len(dropouts) >= protocol.min_survivors(n)

    return must_finish


def secagg_plus_liveness(protocol):
    """SecAgg+ on the complete graph (small rounds) as SecAgg; on a Harary graph only without dropouts
    (its liveness is probabilistic over random dropouts, Bell et al. 2020, not for every schedule)."""

    def must_finish(n, dropouts):
        return protocol.parameters(n).complete and n - len(dropouts) >= protocol.min_survivors(n)

    return must_finish


def he_decryptor_liveness(n, dropouts):
    """HE with a decryptor: a round finishes when one client's upload arrives (protocols/he.md)."""
    return any(dropouts.get(c) not in ("setup", "keys", "upload") for c in range(n))


def he_clients_liveness(n, dropouts):
    """HE with client key holders: client 0, always the dealer, makes the key and is the one client that
    decrypts the verified sum (its own upload in it), so the round finishes exactly when client 0 does not
    drop at all; no other client stands in for it (protocols/he.md, "clients" mode)."""
    return n >= 1 and 0 not in dropouts


HE = dict(clients=(1, 3), dimension=(1, 3), deterministic_view=False, max_examples=3)
HE_VARIANT = dict(HE, max_examples=2)  # the key-holder variants share most code with the defaults

CONFIGS = {
    "plain": (Plain, dict(unprotected=True, max_examples=30)),
    "secagg": (SecAgg, dict(max_examples=10, must_finish=survivors_at_least_t(SecAgg()))),
    "secagg+": (SecAggPlus, dict(max_examples=10, clients=(3, 7), must_finish=secagg_plus_liveness(SecAggPlus()))),
    "secagg-active": (lambda: SecAgg(adversary="active"),
                      dict(max_examples=6, must_finish=survivors_at_least_t(SecAgg(adversary="active")))),
    "secagg+-active": (lambda: SecAggPlus(adversary="active"),
                       dict(max_examples=6, clients=(5, 7),
                            must_finish=secagg_plus_liveness(SecAggPlus(adversary="active")))),
    "ckks": (CKKS, dict(HE, must_finish=he_decryptor_liveness)),
    "ckks-clients": (lambda: CKKS(key_holder="clients"), dict(HE_VARIANT, must_finish=he_clients_liveness)),
    "bfv": (lambda: BFV(value_range=1.0), dict(HE, must_finish=he_decryptor_liveness)),
    "bfv-clients": (lambda: BFV(value_range=1.0, key_holder="clients"),
                    dict(HE_VARIANT, must_finish=he_clients_liveness)),
    "bfv-masked": (lambda: BFV(value_range=1.0, key_holder="masked"),
                   dict(HE_VARIANT, clients=(3, 4),
                        must_finish=survivors_at_least_t(BFV(value_range=1.0, key_holder="masked")))),
}

for _name, (_factory, _options) in CONFIGS.items():
    _class_name = "TestConformance_" + _name.replace("+", "plus").replace("-", "_")
    globals()[_class_name] = conformance_tests(_factory, **_options)


def test_every_registered_protocol_is_checked():
    names = {factory().name for factory, _ in CONFIGS.values()}
    assert set(REGISTRY) <= names


def test_conformance_tests_makes_one_test_per_property_group():
    cls = conformance_tests(Plain, unprotected=True)
    assert sorted(k for k in vars(cls) if k.startswith("test_")) == sorted(f"test_{g}" for g in _GROUPS)
    skip = vars(cls)["test_no_clear_input"].pytestmark[0]
    assert skip.name == "skip"


def test_semi_honest_secagg_detects_a_corrupted_advertised_key():
    """Found by this kit: a bit flip in an advertised key once gave a silent wrong sum; the keys now carry a
    CRC-32 that the server and every neighbour check (protocols/secagg.md, advertise_keys)."""
    check_protocol(SecAgg, properties=["malformed_messages"], message_phases=["advertise_keys"], max_examples=40)


def test_semi_honest_secagg_plus_detects_a_corrupted_advertised_key():
    check_protocol(SecAggPlus, properties=["malformed_messages"], message_phases=["advertise_keys"], max_examples=40)


def test_the_corrupted_key_of_the_finding_is_rejected_and_the_sum_is_right():
    """The finding's example without hypothesis: one flipped bit of client 0's mask key is rejected, client 0
    leaves the round, and the others' sum is exact."""
    from securefed.testing import _driver
    from securefed.testing.strategies import Tampering

    xs = [np.full(3, 0.5)] * 4
    flip = Tampering("bit_flip", "advertise_keys", 0, arg=-38, size=0)  # in s_pk, just before the 4-byte check
    run = _driver.run(SecAgg(), xs, seed=1, alter=flip.alter)
    assert [d.accepted for d in run.deliveries if d.label == "bit_flip"] == [False]
    assert run.aborted is None and run.result[1] == (1, 2, 3)
    assert np.abs(run.result[0] - 1.5).max() <= SecAgg().error_bound(4)


def test_active_secagg_rejects_a_corrupted_advertised_key():
    """The active variant signs the advertised keys, so the same corruption is rejected."""
    check_protocol(lambda: SecAgg(adversary="active"), properties=["malformed_messages"],
                   message_phases=["advertise_keys"], max_examples=10)


def test_bad_options_are_refused():
    with pytest.raises(ConfigurationError, match="not phases"):
        check_protocol(Plain, message_phases=["nope"])
    with pytest.raises(ConfigurationError, match="unknown properties"):
        check_protocol(Plain, properties=["speed"])
    with pytest.raises(ConformanceError, match="refuses every round size"):
        check_protocol(SecAgg, clients=(1, 2))


@pytest.mark.parametrize("options, words", [
    # were TypeError, ValueError or hypothesis' InvalidArgument (issue 21, the public-API fuzz)
    ({"clients": None}, r"clients must be a range \(lo, hi\) of integers"),
    ({"clients": (3, 1)}, "clients must be a range"),
    ({"dimension": None}, "dimension must be a range"),
    ({"dimension": (1, "x")}, "dimension must be a range"),
    ({"value_range": -1}, "value_range must be None or a finite number > 0, got -1"),
    ({"value_range": True}, "value_range must be None or a finite number > 0"),
    ({"unprotected": "yes"}, "unprotected must be True or False"),
    ({"deterministic_view": None}, "deterministic_view must be True or False"),
    ({"must_finish": 3}, "must_finish must be None or a function"),
    ({"message_phases": True}, "message_phases must be None or a collection of names"),
    ({"properties": True}, "properties must be None or a collection of names"),
    ({"properties": "correctness"}, "properties must be None or a collection of names"),
    ({"max_examples": 0}, "max_examples must be None or an integer >= 1, got 0"),
    ({"seed": "x"}, "seed must be None or an integer >= 0"),
])
def test_malformed_options_are_configuration_errors(options, words):
    with pytest.raises(ConfigurationError, match=words):
        check_protocol(Plain, **{"unprotected": True, **options})


@pytest.mark.parametrize("factory", [None, 3, b"x"])
def test_a_factory_that_is_not_callable_is_a_configuration_error(factory):
    with pytest.raises(ConfigurationError, match="protocol_factory must be a callable"):
        check_protocol(factory)
    with pytest.raises(ConfigurationError, match="protocol_factory must return an AggregationProtocol, got int"):
        check_protocol(lambda: 3)
