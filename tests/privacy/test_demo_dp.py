import math

import pytest

import securefed as sf
from securefed.demo import DP_CLIP, DP_NOISE, demo_privacy, run_demo
from securefed.privacy import CentralDP, DistributedDP, compute_epsilon


@pytest.mark.filterwarnings("ignore::securefed.training.SeededSecretsWarning")
def test_dp_demo_reaches_a_useful_accuracy_and_reports_its_epsilon():
    # A pinned accuracy needs pinned noise: a reproducible simulation (its epsilon is void). With secret
    # noise the 20-round accuracy varies from run to run (0.73 to 0.91 in six runs).
    res = run_demo(rounds=20, protocol="plain", dp=True, progress=False, reproducible_secrets=True)
    assert res.accuracy >= 0.8
    assert res.delta == 1e-5 and "central Gaussian" in res.privacy
    assert res.epsilon == pytest.approx(compute_epsilon(noise_multiplier=DP_NOISE, steps=20, delta=1e-5))


def test_demo_uses_distributed_noise_inside_masking_protocols_with_the_central_noise_in_the_full_sum():
    for protocol in (sf.protocols.SecAgg(), sf.protocols.SecAggPlus()):
        cfg = demo_privacy(protocol, 10)
        t = protocol.min_survivors(10)
        assert isinstance(cfg, DistributedDP) and cfg.mechanism == "ddg" and cfg.clipping == DP_CLIP
        assert cfg.noise_multiplier * math.sqrt(10 / t) == pytest.approx(DP_NOISE)  # all 10 shares: DP_NOISE
    assert isinstance(demo_privacy(sf.protocols.Plain(), 10), CentralDP)


def test_the_dp_demo_draws_its_secrets_from_the_os_and_shows_no_training_loss(capsys):
    from securefed.cli import main

    assert main(["demo", "--rounds", "1", "--protocol", "plain", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "round   1/1  acc" in out and "loss" not in out and "epsilon" in out
