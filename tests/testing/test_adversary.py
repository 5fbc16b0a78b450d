"""The malicious-server harness (securefed.testing.adversary) against SecAgg / SecAgg+ clients."""

import numpy as np
import pytest

import securefed as sf
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.secagg import SecAgg, SecAggPlus
from securefed.protocols.secagg import client as secagg_client
from securefed.testing.adversary import (
    AskBothSecrets,
    Deviation,
    InconsistentSurvivorLists,
    SubstitutePublicKey,
    UnmaskBelowThreshold,
    run_round,
)

N = 12
XS = [np.linspace(-1, 1, 9) * ((i % 5) - 2) / 2 for i in range(N)]
KINDS = {
    "secagg": lambda: SecAgg(),
    "secagg+": lambda: SecAggPlus(),
    "secagg-active": lambda: SecAgg(adversary="active"),
    "secagg+-active": lambda: SecAggPlus(adversary="active"),
}


def test_without_deviations_the_harness_runs_the_honest_round():
    protocol = SecAggPlus()
    run = run_round(protocol, XS, [Deviation()], seed=3, dropouts={4: "masked_input"})
    res = sf.simulate_aggregation(protocol, XS, {4: "masked_input"}, seed=3)
    assert run.aborted is None and run.result[1] == res.included
    np.testing.assert_array_equal(run.result[0], res.total)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("victim_dropped", [False, True])
def test_a_client_never_reveals_both_secrets_of_a_peer(kind, victim_dropped):
    protocol = KINDS[kind]()
    victim = 1
    drops = {victim: "masked_input"} if victim_dropped else {}
    run = run_round(protocol, XS, [AskBothSecrets(target=0, victim=victim)], seed=5, dropouts=drops)
    honest, second = run.outcomes("unmasking", 0, "honest"), run.outcomes("unmasking", 0, "ask_both_secrets")
    assert len(honest) == 1 and honest[0].reply is not None
    assert len(second) == 1 and second[0].reply is None
    assert isinstance(second[0].error, ProtocolAborted) and second[0].error.reason is AbortReason.REQUEST_REFUSED
    assert run.aborted is None  # the honest round still completes
    np.testing.assert_allclose(run.result[0], np.sum([XS[i] for i in run.result[1]], axis=0),
                               atol=protocol.error_bound(N))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_client_refuses_to_unmask_for_fewer_than_t_survivors(kind):
    protocol = KINDS[kind]()
    phase = "consistency_check" if kind.endswith("active") else "unmasking"
    run = run_round(protocol, XS, [UnmaskBelowThreshold(target=2, phase=phase)], seed=6)
    [d] = run.outcomes(phase, 2, "unmask_below_threshold")
    assert d.reply is None and isinstance(d.error, ProtocolAborted)
    assert d.error.reason is AbortReason.TOO_FEW_SURVIVORS
    assert not run.outcomes("unmasking", 2, "honest")  # and it never answers later


@pytest.mark.parametrize("protocol", [SecAgg(adversary="active"), SecAggPlus(adversary="active")],
                         ids=["secagg", "secagg+"])
@pytest.mark.parametrize("mode", ["swap", "foreign_signatures"])
def test_active_clients_refuse_inconsistent_survivor_lists(protocol, mode):
    run = run_round(protocol, XS, [InconsistentSurvivorLists(victim=N - 1, group={0, 1, 2, 3}, mode=mode)], seed=7)
    unmask = [d for d in run.deliveries if d.phase == "unmasking"]
    assert {d.party for d in unmask} == set(range(N))
    assert all(d.reply is None and isinstance(d.error, ProtocolAborted) for d in unmask)
    assert {d.error.reason for d in unmask} == {AbortReason.CONSISTENCY_CHECK_FAILED}
    assert run.aborted is not None and run.result is None


def test_active_clients_detect_a_substituted_public_key():
    run = run_round(SecAgg(adversary="active"), XS, [SubstitutePublicKey(target=0, victim=1)], seed=8)
    [d] = run.outcomes("share_keys", 0)
    assert isinstance(d.error, MessageRejected) and d.reply is None
    assert run.result is not None and 0 not in run.result[1]


def test_the_harness_catches_a_client_that_skips_the_survivor_rules(monkeypatch):
    """The checks above can fail: with the honest-client rule removed, the deviation gets an answer."""
    monkeypatch.setattr(secagg_client, "_check_survivors", lambda c, survivors, phase: None)
    run = run_round(SecAgg(), XS, [UnmaskBelowThreshold(target=2)], seed=6)
    [d] = run.outcomes("unmasking", 2, "unmask_below_threshold")
    assert d.reply is not None
