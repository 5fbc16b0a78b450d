"""FedProx (issue 23, point 3): ``proximal_mu`` adds (mu/2) ||w - w_global||^2 to the local objective."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import securefed as sf
from securefed._trainer_steps import ProximalSGD
from securefed.encoding import flatten
from securefed.errors import ConfigurationError

LR, MU = 0.1, 0.5


def params(m):
    return flatten(dict(m.named_parameters()))[0]


def regression(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3 + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 1))


def two_prox_steps_by_hand(data, w0, b0, mu, *, train_bias=True):
    """Two full-batch gradient steps on mean((X w + b - y)^2) + (mu/2)(||w - w0||^2 + ||b - b0||^2), float64."""
    x, y = (t.numpy().astype(np.float64) for t in data.tensors)
    w, b = w0.copy(), b0.copy()
    for _ in range(2):
        r = x @ w.T + b - y  # (n, 1)
        grad_w = 2 / len(x) * r.T @ x + mu * (w - w0)
        grad_b = 2 / len(x) * r.sum(axis=0) + mu * (b - b0)
        w = w - LR * grad_w
        b = b - LR * grad_b if train_bias else b
    return w, b


def run(mu, data, **kw):
    m = linear()
    sf.Trainer(m, [data], loss_fn=torch.nn.functional.mse_loss, lr=LR, local_epochs=2, batch_size=len(data),
               proximal_mu=mu, progress=False, **kw).fit(1)
    return m


def start():
    m = linear()
    return m[0].weight.detach().numpy().astype(np.float64), m[0].bias.detach().numpy().astype(np.float64)


def test_two_full_batch_local_steps_are_the_two_proximal_gradient_steps_by_hand():
    data = regression()
    w, b = two_prox_steps_by_hand(data, *start(), MU)
    m = run(MU, data)  # one participant, FedAvg: the new model is its trained model
    np.testing.assert_allclose(m[0].weight.detach().numpy(), w, atol=1e-6)
    np.testing.assert_allclose(m[0].bias.detach().numpy(), b, atol=1e-6)
    # The term matters: without it (mu = 0) the second step lands elsewhere.
    w0, _ = two_prox_steps_by_hand(data, *start(), 0.0)
    np.testing.assert_allclose(run(0.0, data)[0].weight.detach().numpy(), w0, atol=1e-6)
    assert np.abs(w - w0).max() > 1e-3


def test_the_proximal_term_covers_only_the_selected_parameters():
    data = regression()
    w, _ = two_prox_steps_by_hand(data, *start(), MU, train_bias=False)
    m = run(MU, data, parameters=["0.weight"])
    np.testing.assert_allclose(m[0].weight.detach().numpy(), w, atol=1e-6)
    np.testing.assert_array_equal(m[0].bias.detach().numpy(), start()[1].astype(np.float32))


def test_proximal_sgd_is_sgd_on_the_loss_plus_the_squared_proximal_term():
    data = regression()
    x, y = data.tensors
    a, b = linear(), linear()
    anchor = [p.detach().clone() for p in b.parameters()]
    prox = ProximalSGD(a.parameters(), mu=MU, lr=LR, momentum=0.9)
    plain = torch.optim.SGD(b.parameters(), lr=LR, momentum=0.9)
    for _ in range(3):
        prox.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        prox.step()
        plain.zero_grad()
        term = sum(((p - q) ** 2).sum() for p, q in zip(b.parameters(), anchor))
        (torch.nn.functional.mse_loss(b(x), y) + MU / 2 * term).backward()
        plain.step()
    np.testing.assert_allclose(params(a), params(b), atol=1e-6)


def test_proximal_mu_zero_is_plain_local_sgd():
    data = regression()
    m = linear()
    sf.Trainer(m, [data], loss_fn=torch.nn.functional.mse_loss, lr=LR, local_epochs=2, batch_size=len(data),
               progress=False).fit(1)
    np.testing.assert_array_equal(params(run(0.0, data)), params(m))


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf, True, "0.1", None])
def test_a_bad_proximal_mu_is_refused(mu):
    with pytest.raises(ConfigurationError, match="proximal_mu"):
        sf.Trainer(linear(), [regression()], proximal_mu=mu, progress=False)


def test_fedprox_runs_under_sample_level_dp():
    data = regression(n=40)
    privacy = sf.privacy.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, delta=1e-5)
    m = linear()
    before = params(m).copy()
    h = sf.Trainer(m, [data, regression(n=40, seed=1)], privacy=privacy, loss_fn=torch.nn.functional.mse_loss,
                   lr=LR, proximal_mu=MU, progress=False, seed=3).fit(2)
    assert h.final.epsilon is not None and h.final.epsilon > 0
    assert np.isfinite(params(m)).all() and not np.array_equal(params(m), before)
