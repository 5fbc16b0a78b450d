"""Issue 19: secret randomness never comes from the public seed unless a simulation asks for it, a seeded
run says so everywhere, and under DP no exact statistic of the participants' data is released."""

import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import securefed as sf
from securefed.audit import verify
from securefed.audit.keys import key_paths
from securefed.cli import main
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy import CentralDP, DistributedDP, SampleLevelDP, sampling
from securefed.training import SeededSecretsWarning, _seed_bytes, progress_status
from tests._toy import federation, model

#: Where the server noise of round 1 came from before issue 19 (the public seed), and where a
#: reproducible simulation derives it now.
DERIVATIONS = {"old": (0, "trainer"), "new": (0, "trainer/secrets")}


def released_noise(**kw):
    """The issue's probe: a zero model trained at lr 0, so the release is the server's noise (times 1/4)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(100, 10, bias=False)
    torch.nn.init.zeros_(m.weight)
    g = torch.Generator().manual_seed(0)
    data = [TensorDataset(torch.randn(2, 100, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(4)]
    t = sf.Trainer(m, data, privacy=CentralDP(noise_multiplier=1.0, clipping=1.0), lr=0.0, progress=False, **kw)
    t.run_round()
    return m.weight.detach().double().numpy().ravel() * 4


def regenerated(seed, label):
    rng = RandomSource(_seed_bytes(seed, label)).child("privacy").child("round/1/server-noise")
    return sampling.gaussian(rng, 1.0, 1000).astype(np.float32)


def test_default_trainers_release_noise_the_seed_cannot_regenerate():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededSecretsWarning)  # the default never warns: nothing is seeded
        a, b = released_noise(), released_noise()
    assert np.abs(a - b).max() > 0.5  # two default runs: different noise
    assert 0.8 < a.std() < 1.2  # it is noise of std 1
    for name, (seed, label) in DERIVATIONS.items():
        for release in (a, b):
            assert np.abs(release - regenerated(seed, label)).max() > 0.5, f"the {name} derivation recovers the noise"


def test_a_reproducible_simulation_is_what_the_derivation_regenerates():
    """The control: the probe does find seeded noise, so its failure above means the noise is secret."""
    with pytest.warns(SeededSecretsWarning, match="void"):
        a = released_noise(seed=0, reproducible_secrets=True)
    with pytest.warns(SeededSecretsWarning):
        b = released_noise(seed=0, reproducible_secrets=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, regenerated(*DERIVATIONS["new"]), atol=1e-5)
    assert np.abs(a - regenerated(*DERIVATIONS["old"])).max() > 0.5


def test_protocol_masks_are_secret_by_default():
    """SecAgg's keys, masks and rounding coins: two default runs of one seed aggregate differently."""
    def run(**kw):
        m = model()
        sf.Trainer(m, federation(), protocol=sf.protocols.SecAgg(value_range=8.0, value_bits=16), progress=False,
                   **kw).fit(1)
        return torch.nn.utils.parameters_to_vector(m.parameters()).detach().numpy()

    assert not np.array_equal(run(seed=3), run(seed=3))  # stochastic rounding differs: fresh coins
    with pytest.warns(SeededSecretsWarning):
        first = run(seed=3, reproducible_secrets=True)
    with pytest.warns(SeededSecretsWarning):
        np.testing.assert_array_equal(first, run(seed=3, reproducible_secrets=True))


MECHANISMS = {
    "central": (CentralDP(noise_multiplier=1.0, clipping=0.5), sf.protocols.Plain),
    "distributed": (DistributedDP(noise_multiplier=1.0, clipping=0.5), lambda: sf.protocols.SecAgg(threshold=3)),
    "dp-sgd": (SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25), sf.protocols.Plain),
}


@pytest.mark.parametrize("kind", list(MECHANISMS))
def test_every_mechanism_draws_fresh_noise_by_default_and_a_simulation_repeats(kind):
    privacy, protocol = MECHANISMS[kind]

    def run(**kw):
        m = model()
        sf.Trainer(m, federation(), protocol=protocol(), privacy=privacy, progress=False, **kw).fit(1)
        return torch.nn.utils.parameters_to_vector(m.parameters()).detach().numpy()

    assert not np.array_equal(run(seed=3), run(seed=3))
    with pytest.warns(SeededSecretsWarning):
        first = run(seed=3, reproducible_secrets=True)
    with pytest.warns(SeededSecretsWarning):
        np.testing.assert_array_equal(first, run(seed=3, reproducible_secrets=True))


def test_poisson_samples_are_secret_by_default():
    def samples(**kw):
        t = sf.Trainer(model(), federation(), privacy=CentralDP(noise_multiplier=1.0), clients_per_round=2,
                       algorithm="fedsgd", progress=False, **kw)
        return [t.run_round().included for _ in range(12)]

    assert samples(seed=3) != samples(seed=3)  # equal by chance with probability below 1e-14
    with pytest.warns(SeededSecretsWarning):
        first = samples(seed=3, reproducible_secrets=True)
    with pytest.warns(SeededSecretsWarning):
        assert samples(seed=3, reproducible_secrets=True) == first


def test_a_seeded_run_is_flagged_by_the_warning_the_history_the_log_and_verify(tmp_path, caplog, capsys):
    path = tmp_path / "seeded.jsonl"
    with caplog.at_level(logging.WARNING, logger="securefed.training"), \
            pytest.warns(SeededSecretsWarning, match="seed=4, reproducible_secrets=True"):
        t = sf.Trainer(model(), federation(), privacy=CentralDP(noise_multiplier=1.0), progress=False, seed=4,
                       reproducible_secrets=True, audit_log=path)
    assert "void" in caplog.text
    h = t.fit(2)
    t.audit.close()
    assert h.seeded_secrets is True
    start = json.loads(path.read_text().splitlines()[0])
    assert start["body"]["seeded_secrets"] is True and start["body"]["config"]["reproducible_secrets"] is True
    res = verify(path, key_paths(path)[1])
    assert not res.ok and res.seeded_secrets and res.epsilon_void
    assert [(f.entry, f.field) for f in res.failures] == [(1, "body.seeded_secrets")]
    ok = verify(path, key_paths(path)[1], allow_seeded=True)
    assert ok.ok and ok.epsilon_void and "epsilon is VOID" in ok.summary()
    assert ok.epsilon == pytest.approx(h.final.epsilon)
    assert main(["audit", "verify", str(path)]) == 1
    assert "body.seeded_secrets" in capsys.readouterr().out
    assert main(["audit", "verify", str(path), "--allow-seeded", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["seeded_secrets"] and doc["epsilon_void"]
    # A default run resuming the log: its own session says false, the log stays void.
    t2 = sf.Trainer(model(), federation(), privacy=CentralDP(noise_multiplier=1.0), progress=False, audit_log=path)
    assert t2.fit(1).seeded_secrets is False
    t2.audit.close()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["body"]["seeded_secrets"] for e in entries if e["type"] in ("run_start", "resume")] == [True, False]
    assert not verify(path).ok and verify(path, allow_seeded=True).epsilon_void


def test_a_default_run_is_not_flagged(tmp_path):
    path = tmp_path / "default.jsonl"
    t = sf.Trainer(model(), federation(), privacy=CentralDP(noise_multiplier=1.0), progress=False, audit_log=path)
    assert t.fit(1).seeded_secrets is False
    t.audit.close()
    assert json.loads(path.read_text().splitlines()[0])["body"]["seeded_secrets"] is False
    res = verify(path, key_paths(path)[1])
    assert res.ok and not res.seeded_secrets and not res.epsilon_void and "VOID" not in res.summary()


def test_reproducible_secrets_needs_a_seed():
    with pytest.raises(ConfigurationError, match="seed"):
        sf.Trainer(model(), federation(), progress=False, seed=None, reproducible_secrets=True)
    with pytest.raises(ConfigurationError, match="True or False"):
        sf.Trainer(model(), federation(), progress=False, reproducible_secrets="yes")


class LossSpy:
    """Wraps a trainer's local training and keeps each participant's exact loss."""

    def __init__(self, trainer):
        self.losses, inner = [], trainer._local_update

        def spy(client, start, spec):
            delta, loss = inner(client, start, spec)
            self.losses.append(loss)
            return delta, loss

        trainer._local_update = spy

    def statistics(self):
        """Every exact private statistic a release could carry: each loss and the round means."""
        out = list(self.losses)
        out += [float(np.mean(self.losses[i:i + 4])) for i in range(0, len(self.losses), 4)]
        return out


NUMBER = re.compile(r"-?\d+\.(\d+)(?:e[-+]?\d+)?")


def renders(token, decimals, value):
    """Whether a printed number (with `decimals` digits after the point) is `value` rounded or cut there."""
    if not np.isfinite(value):
        return False
    step = 10.0 ** -decimals
    return abs(float(token) - value) <= step * 1.01


def appears(value, text, public=()):
    """Whether `value` shows in `text` as a printed number of 3 or more decimals that is not a printing of
    a released (public) value: a private loss that rounds like the public evaluation loss is a coincidence,
    not a leak, and a prefix of a longer public number is not a number of its own."""
    for m in NUMBER.finditer(text):
        token, decimals = m.group(0), len(m.group(1))
        if decimals < 3 or "e" in token:
            continue
        if renders(token, decimals, value) and not any(renders(token, decimals, p) for p in public):
            return True
    return False


def test_the_leak_check_sees_a_printed_private_loss_and_ignores_public_numbers():
    assert appears(1.09734, "round 1: loss 1.0973 acc 0.5")
    assert appears(1.0973412345, "loss=1.09734123")
    assert appears(1.09734, "{'x': 1.09734}")
    assert not appears(1.09734, "round 1: eval_loss 1.0973 acc 0.5", public=[1.0974])  # same digits as public
    assert not appears(1.0720, "eval_loss 1.0728018283843994", public=[1.0728018283843994])
    assert not appears(1.09734, "eps 1.10 bytes 650.0")  # too coarse to be a statistic


@pytest.mark.parametrize("privacy", [CentralDP(noise_multiplier=1.0, clipping=0.5),
                                     SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25)],
                         ids=["client-level", "sample-level"])
def test_under_dp_no_exact_private_statistic_reaches_history_progress_log_or_audit(privacy, tmp_path, caplog,
                                                                                 capsys):
    path = tmp_path / "dp.jsonl"
    public = federation(sizes=(30,), seed=9)[0]  # the server's own data: its evaluation is released as is
    t = sf.Trainer(model(), federation(), privacy=privacy, eval_dataset=public, progress=True, audit_log=path)
    spy = LossSpy(t)
    with caplog.at_level(logging.INFO, logger="securefed.training"):
        h = t.fit(2)
    t.audit.close()
    shown = capsys.readouterr()
    assert len(spy.losses) == 8 and all(np.isfinite(spy.losses))
    assert all(r.loss is None for r in h.rounds)
    metrics = [r.metrics for r in h.rounds]
    assert all("loss" not in m for m in metrics)
    released = [v for m in metrics for v in m.values()]
    assert not any(np.isclose(v, s, rtol=1e-6, atol=0) for v in released for s in spy.statistics())
    logged = [json.loads(line)["body"].get("metrics") for line in path.read_text().splitlines()]
    logged = [m for m in logged if m is not None]
    assert len(logged) == 2 and all("loss" not in m for m in logged)
    assert not any(np.isclose(v, s, rtol=1e-6, atol=0) for m in logged for v in m.values() if v is not None
                   for s in spy.statistics())
    text = shown.out + shown.err + caplog.text + "".join(progress_status(r) for r in h.rounds)
    assert not re.search(r"\bloss\b(?! ?[=:]? ?None)", text.replace("eval_loss", "")), text
    assert not any(appears(s, text, public=released) for s in spy.statistics())
    assert "acc" in progress_status(h.final) and "eps" in shown.out  # the bar shows public evaluation, epsilon


def test_without_dp_the_loss_is_released_as_before(tmp_path):
    path = tmp_path / "plain.jsonl"
    t = sf.Trainer(model(), federation(), progress=False, audit_log=path)
    spy = LossSpy(t)
    h = t.fit(1)
    t.audit.close()
    weights = [len(d) for d in federation()]
    assert h.final.loss == pytest.approx(np.average(spy.losses, weights=weights))
    assert json.loads(path.read_text().splitlines()[1])["body"]["metrics"]["loss"] == h.final.loss
    assert progress_status(h.final).startswith("loss ")
