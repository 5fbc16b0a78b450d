"""securefed.rounds.RoundEngine: the server side of a round that Trainer and SecureFedAvg share."""

import numpy as np
import pytest

import securefed as sf
from securefed import optim
from securefed.crypto.random import RandomSource
from securefed.errors import InvalidInput, PrivacyBudgetExceeded
from securefed.privacy import CentralDP, PrivacySession
from securefed.rounds import RoundEngine


def session(population=4, k=4, **kw):
    privacy = CentralDP(noise_multiplier=1.0, clipping=1.0, **kw)
    return PrivacySession(privacy, protocol=sf.protocols.Plain(), population=population, clients_per_round=k,
                          dimension=3, local_steps=1, rng=RandomSource(0))


def test_without_privacy_the_mean_is_weighted_or_uniform_and_the_sum_kept_unless_in_place():
    total = np.array([2.0, 4.0, 6.0, 0.5])  # weighted sum of a 3-vector, summed weight 0.5
    engine = RoundEngine(sf.protocols.Plain(), None, weighting="examples", optimizer=optim.FedAvg())
    mean, released = engine.release(1, total, 2, 2)
    np.testing.assert_array_equal(mean, [4.0, 8.0, 12.0])
    assert released is total and total[0] == 2.0
    mean, _ = engine.release(1, total, 2, 2, in_place=True)
    assert np.shares_memory(mean, total) and total[0] == 4.0
    uniform = RoundEngine(sf.protocols.Plain(), None, weighting="uniform", optimizer=optim.FedAvg())
    mean, _ = uniform.release(1, np.array([2.0, 4.0]), 2, 3)
    np.testing.assert_array_equal(mean, [1.0, 2.0])
    assert uniform.input_size(3) == 3 and engine.input_size(3) == 4
    x = engine.client_input(np.array([1.0, 2.0, 3.0]), [3], 0.5)
    np.testing.assert_array_equal(x, np.float32([0.5, 1.0, 1.5, 0.5]))


def test_the_release_hook_runs_after_the_event_is_accounted_and_before_the_step():
    dp = session()
    engine = RoundEngine(sf.protocols.Plain(), dp, weighting="uniform", optimizer=optim.FedAvgM(server_momentum=0.9))
    before = engine.optimizer
    seen = []

    def hook():
        seen.append((len(dp.accountant), engine.optimizer is before))
        raise RuntimeError("the witness is down")

    plan = engine.plan(1, [0, 1, 2, 3])
    assert plan is not None and plan.participants == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        engine.finish(1, np.zeros(3, np.float32), np.ones(3), 4, 4, on_release=hook)
    assert seen == [(1, True)] and engine.optimizer is before  # accounted, not stepped
    out = engine.finish(2, np.zeros(3, np.float32), np.ones(3), 4, 4)
    assert out.epsilon == dp.epsilon() and out.metrics["l2_clip"] == 1.0 and engine.optimizer is not before
    np.testing.assert_array_equal(out.released, dp.released)


def test_plan_skips_a_sample_too_small_checks_the_callers_refusals_then_the_budget():
    dp = session(population=4, k=2, target_epsilon=1e-6)
    engine = RoundEngine(sf.protocols.Plain(), dp, weighting="uniform", optimizer=optim.FedAvg())
    assert engine.plan(1, []) is None  # nothing spent, no check run
    calls = []
    with pytest.raises(PrivacyBudgetExceeded):
        engine.plan(1, [0, 2], check=calls.append)
    assert calls == [[0, 2]] and len(dp.accountant) == 0


def test_a_step_to_inf_leaves_the_optimizer_as_it_was():
    engine = RoundEngine(sf.protocols.Plain(), None, weighting="uniform",
                         optimizer=optim.FedAvgM(server_learning_rate=1e300, server_momentum=0.5))
    before = engine.optimizer
    with pytest.raises(InvalidInput):
        engine.step(np.zeros(2, np.float32), np.ones(2), 1)
    assert engine.optimizer is before
