import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy import DPSGD, GaussianEvent

loss_fn = torch.nn.functional.cross_entropy


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def batch(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def naive_per_example(model, x, y):
    out = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("ghost", [True, False])  # Linear layers by Lemma D12, or every gradient materialized
@pytest.mark.parametrize("chunk_floats", [2**26, 100])  # the whole batch at once, or 1-2 examples at a time
@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_clipped_sum_is_the_sum_of_individually_clipped_per_example_gradients(clip, chunk_floats, ghost):
    model, (x, y) = mlp(), batch()
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=clip, sampling_rate=0.5)
    dp.chunk_floats, dp.ghost_clipping = chunk_floats, ghost
    grads, losses = dp.clipped_sum(model, (x, y), loss_fn)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for per in naive_per_example(model, x, y):
        norm = math.sqrt(sum(float((g * g).sum()) for g in per))
        factor = min(1.0, clip / (norm + 1e-6))
        assert norm * factor < clip or clip == 1e6  # each clipped contribution stays below C
        for e, g in zip(expected, per):
            e += factor * g
    for (_, g), e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, torch.stack([loss_fn(model(x[i:i + 1]), y[i:i + 1]) for i in range(7)]).detach())


def test_noise_has_std_z_c_over_the_expected_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100)  # 10,100 parameters
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    data = TensorDataset(torch.randn(40, 100), torch.zeros(40, 100))
    dp = DPSGD(noise_multiplier=1.3, max_grad_norm=0.7, sampling_rate=0.5)

    def zero_loss(out, target):  # no signal: the step is the noise alone
        return (out * 0.0).sum()

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp.train(model, data, loss_fn=zero_loss, optimizer=opt, steps=1, rng=RandomSource(3))
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    expected = 1.3 * 0.7 / (0.5 * 40)
    sd = step.std().item()
    assert sd == pytest.approx(expected, rel=5 * math.sqrt(1 / (2 * step.numel())))  # 5 sd of the estimate
    assert abs(step.mean().item()) < 5 * expected / math.sqrt(step.numel())


def test_each_step_takes_a_poisson_sample(monkeypatch):
    sizes = []
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25)

    def spy(self, model, b, fn):  # record the batch; skip the gradients (tested above)
        sizes.append(0 if b is None else len(b[1]))
        return [(p, torch.zeros_like(p)) for p in model.parameters()], torch.zeros(sizes[-1])

    monkeypatch.setattr(DPSGD, "clipped_sum", spy)
    x, y = batch(40)
    model = mlp()
    dp.train(model, TensorDataset(x, y), loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
             steps=400, rng=RandomSource(4))
    sizes = np.array(sizes)
    assert sizes.mean() == pytest.approx(10.0, abs=5 * math.sqrt(7.5 / 400))  # Binomial(40, 1/4)
    assert sizes.var() == pytest.approx(7.5, rel=0.3)
    assert len(set(sizes.tolist())) > 5  # variable batch sizes, not a fixed-size sample


def test_steps_and_event():
    dp = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=0.03)
    assert dp.steps_per_epoch == 33
    assert dp.event(round=2) == GaussianEvent(noise_multiplier=1.1, sampling_rate=0.03, steps=33, num_clients=1,
                                              round=2)


def test_batch_norm_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    x, y = batch()
    with pytest.raises(ConfigurationError, match="batch normalization"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5).train(
            model, TensorDataset(x, y), loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            steps=1, rng=RandomSource(0))


@pytest.mark.parametrize("kwargs", [dict(noise_multiplier=0.0), dict(max_grad_norm=-1.0), dict(sampling_rate=0.0),
                                    dict(sampling_rate=1.5)])
def test_bad_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        DPSGD(**{**dict(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1), **kwargs})


def test_sampling_rate_one_trains_on_every_example(monkeypatch):
    """Every accepted rate runs: q = 1 used to overflow building the threshold (2.0**64 - 1 == 2.0**64)."""
    sizes = []
    real = DPSGD.clipped_sum

    def spy(self, model, b, fn):
        sizes.append(0 if b is None else len(b[1]))
        return real(self, model, b, fn)

    monkeypatch.setattr(DPSGD, "clipped_sum", spy)
    x, y = batch(12)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=1.0)
    loss = dp.train(model, TensorDataset(x, y), loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    steps=3, rng=RandomSource(0))
    assert dp.steps_per_epoch == 1 and sizes == [12, 12, 12] and math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_with_sample_level_dp_at_rate_one():
    import securefed as sf
    from securefed.privacy import SampleLevelDP, compute_epsilon
    from tests._toy import federation
    from tests._toy import model as toy_model

    t = sf.Trainer(toy_model(), federation(), privacy=SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0,
                                                                    sampling_rate=1.0, delta=1e-5),
                   progress=False, seed=1, clients_per_round=2)
    h = t.fit(rounds=2)
    assert [e["sampling_rate"] for e in t.accountant.ledger] == [1.0, 1.0]
    assert h.final.epsilon == pytest.approx(compute_epsilon(noise_multiplier=1.0, steps=2, delta=1e-5), rel=1e-9)
