"""Server optimizers in the trainer and the Flower strategy (issue 23, point 2).

The optimizers themselves are checked against Flower's classes in tests/test_optim.py; here:
the trainer and SecureFedAvg apply them to the round's mean update, a failed step changes
nothing, and their state survives a checkpoint and resume.
"""

import json

import numpy as np
import pytest
import torch

import securefed as sf
from securefed import optim
from securefed.encoding import flatten
from securefed.errors import ConfigurationError, InvalidInput, SeededSecretsWarning
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.testing import InProcessGrid
from tests._toy import federation, model
from tests.flower import apps
from tests.flower.test_resume import Crash, CrashingGrid, updates

ETA, B1, B2, TAU = 0.05, 0.9, 0.99, 1e-3


def params(m):
    return flatten(dict(m.named_parameters()))[0]


def fedsgd_mean(m, data, lr):
    """The example-weighted mean of the participants' one full-batch SGD step from `m`'s weights (float64)."""
    start = params(m).astype(np.float64)
    total = np.zeros_like(start)
    for d in data:
        local = model()
        local.load_state_dict(m.state_dict())
        opt = torch.optim.SGD(local.parameters(), lr=lr)
        x, y = d.tensors
        torch.nn.functional.cross_entropy(local(x), y).backward()
        opt.step()
        total += len(d) * (params(local).astype(np.float64) - start)
    return total / sum(len(d) for d in data)


def adam_by_hand(deltas):
    """Flower's FedAdam (flwr.serverapp.strategy.FedAdam.aggregate_train) written out: what each round adds to
    the weights, and the last m_t and v_t. Bias correction with round t + 1 for round t counted from 1."""
    m = v = np.zeros_like(deltas[0])
    steps = []
    for t, d in enumerate(deltas, start=1):
        m = B1 * m + (1 - B1) * d
        v = B2 * v + (1 - B2) * d**2
        eta_norm = ETA * np.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
        steps.append(eta_norm * m / (np.sqrt(v) + TAU))
    return steps, m, v


def test_fedadam_on_fedsgd_steps_matches_flowers_formula_by_hand():
    data, lr, rounds = federation(sizes=(10, 30, 20)), 0.1, 4
    m = model()
    t = sf.Trainer(m, data, algorithm="fedsgd", lr=lr, progress=False,
                   server_optimizer=optim.FedAdam(eta=ETA, beta_1=B1, beta_2=B2, tau=TAU))
    shadow, deltas, seen = model(), [], []
    for _ in range(rounds):
        deltas.append(fedsgd_mean(shadow, data, lr))  # this round's mean update, from the model before it
        t.run_round()
        seen.append(params(m).astype(np.float64))
        with torch.no_grad():  # the next round starts where the trainer's model is
            for p, q in zip(shadow.parameters(), m.parameters()):
                p.copy_(q)
    # Each round starts from the trainer's (float32) model of the round before.
    starts = [params(model()).astype(np.float64)] + seen[:-1]
    steps, m_t, v_t = adam_by_hand(deltas)
    for r in range(rounds):
        np.testing.assert_allclose(seen[r], starts[r] + steps[r], rtol=1e-5, atol=1e-6)
    state = t.server_optimizer.state_dict()
    np.testing.assert_allclose(state["m_t"], m_t, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(state["v_t"], v_t, rtol=1e-5, atol=1e-12)
    # FedAdam is not FedAvg here: the same run with server_lr's FedAvg ends elsewhere.
    plain = model()
    sf.Trainer(plain, data, algorithm="fedsgd", lr=lr, progress=False).fit(rounds)
    assert np.abs(params(plain) - seen[-1]).max() > 1e-2


def test_the_users_optimizer_is_copied_and_the_audit_config_names_it(tmp_path):
    mine = optim.FedAdam(eta=ETA)
    t = sf.Trainer(model(), federation(), progress=False, server_optimizer=mine, audit_log=tmp_path / "a.jsonl")
    t.fit(2)
    assert mine.state_dict() == {} and set(t.server_optimizer.state_dict()) == {"m_t", "v_t"}
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert first["body"]["config"]["server_optimizer"] == mine.describe()


def test_server_lr_is_fedavgm_shorthand_and_not_both():
    assert sf.Trainer(model(), federation(), progress=False).server_optimizer.describe() == {"optimizer": "FedAvg"}
    t = sf.Trainer(model(), federation(), progress=False, server_lr=2.0)
    assert t.server_optimizer.describe() == {"optimizer": "FedAvgM", "server_learning_rate": 2.0,
                                             "server_momentum": 0.0}
    with pytest.raises(ConfigurationError, match="not both"):
        sf.Trainer(model(), federation(), progress=False, server_lr=2.0, server_optimizer=optim.FedAdam())
    with pytest.raises(ConfigurationError, match="securefed.optim"):
        sf.Trainer(model(), federation(), progress=False, server_optimizer=torch.optim.SGD)


def test_a_step_that_overflows_the_model_changes_neither_model_nor_optimizer_state():
    t = sf.Trainer(model(), federation(), progress=False,
                   server_optimizer=optim.FedAvgM(server_learning_rate=1e300, server_momentum=0.5))
    before = params(t.model).copy()
    with pytest.raises(InvalidInput, match="inf or NaN .*FedAvgM"):
        t.run_round()  # finite in float64, inf in the model's float32
    assert np.array_equal(params(t.model), before)
    assert t.server_optimizer.state_dict() == {}


@pytest.mark.parametrize("privacy", [
    pytest.param(lambda: sf.privacy.CentralDP(noise_multiplier=1.0, clipping=0.5, delta=1e-5), id="central"),
    pytest.param(lambda: sf.privacy.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5,
                                                  delta=1e-5), id="sample level"),
])
def test_under_dp_a_server_optimizer_and_fedprox_leave_the_accounting_unchanged(privacy):
    """Post-processing: the optimizer sees only the released mean, FedProx's term holds no data."""
    def run(**kw):  # seeded secrets: both runs sample the same participants (and noise)
        with pytest.warns(SeededSecretsWarning):
            t = sf.Trainer(model(), federation(), privacy=privacy(), clients_per_round=3, progress=False, seed=4,
                           reproducible_secrets=True, **kw)
        h = t.fit(3)
        return [r.epsilon for r in h.rounds], list(t.accountant.ledger), params(t.model)

    eps, ledger, w = run()
    eps_adam, ledger_adam, w_adam = run(server_optimizer=optim.FedAdam(eta=ETA), proximal_mu=0.5)
    assert eps_adam == eps and ledger_adam == ledger and all(e > 0 for e in eps)
    assert not np.array_equal(w_adam, w)


# -- the Flower strategy ---------------------------------------------------------------------------------

N, ROUNDS = 4, 3


def strategy(path, **kw):
    return SecureFedAvg(protocol=sf.protocols.Plain(), seed=7, phase_timeout=0.05, train_timeout=0.05,
                        poll_interval=0.01, checkpoint_dir=path / "ckpt", audit_log=path / "audit.jsonl", **kw)


def adam():
    return optim.FedAdam(eta=ETA, beta_1=B1, beta_2=B2, tau=TAU)


def test_secure_fedavg_with_fedadam_applies_flowers_formula(tmp_path):
    grid = InProcessGrid(apps.client_app(sf.protocols.Plain(), updates), apps.nodes(N))
    res = strategy(tmp_path, server_optimizer=adam()).start(grid, apps.model(), num_rounds=ROUNDS)
    # Node p moves the model by (p + 1) 0.5^r; every node reports 10 examples: the mean is 2.5 * 0.5^r.
    deltas = [np.full(apps.dim(), 2.5 * 0.5**r) for r in range(1, ROUNDS + 1)]
    steps, _, _ = adam_by_hand(deltas)
    np.testing.assert_allclose(apps.vector(res.arrays), np.sum(steps, axis=0), rtol=1e-6)


@pytest.mark.parametrize("crash_round", [2, 3])
def test_secure_fedavg_with_fedadam_resumes_from_a_checkpoint_like_an_uninterrupted_run(tmp_path, crash_round):
    protocol = sf.protocols.Plain()
    (tmp_path / "ref").mkdir()
    ref_grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    ref = strategy(tmp_path / "ref", server_optimizer=adam()).start(ref_grid, apps.model(), num_rounds=ROUNDS)
    grid = CrashingGrid(apps.client_app(protocol, updates), apps.nodes(N), crash_at=(crash_round, "upload"))
    with pytest.raises(Crash):
        strategy(tmp_path, server_optimizer=adam()).start(grid, apps.model(), num_rounds=ROUNDS)
    state, _, _, saved = _checkpoint.load_all(tmp_path / "ckpt")
    assert state["round"] == crash_round - 1 and state["optimizer"]["config"] == adam().describe()
    assert set(saved) == {"m_t", "v_t"}  # the moments after the committed round
    res = strategy(tmp_path, server_optimizer=adam()).start(grid, apps.model(), num_rounds=ROUNDS)
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))
    _, _, _, resumed = _checkpoint.load_all(tmp_path / "ckpt")
    _, _, _, uninterrupted = _checkpoint.load_all(tmp_path / "ref" / "ckpt")
    for k in ("m_t", "v_t"):
        np.testing.assert_array_equal(resumed[k], uninterrupted[k])


@pytest.mark.parametrize("other", [
    pytest.param(lambda: optim.FedAdam(eta=ETA / 2), id="other settings"),
    pytest.param(lambda: optim.FedYogi(), id="other optimizer"),
    pytest.param(lambda: None, id="server_lr shorthand"),
])
def test_a_resume_with_another_server_optimizer_is_refused(tmp_path, other):
    grid = InProcessGrid(apps.client_app(sf.protocols.Plain(), updates), apps.nodes(N))
    strategy(tmp_path, server_optimizer=adam()).start(grid, apps.model(), num_rounds=1)
    with pytest.raises(ConfigurationError, match="server optimizer"):
        strategy(tmp_path, server_optimizer=other()).start(grid, apps.model(), num_rounds=2)
    assert _checkpoint.load(tmp_path / "ckpt")[0]["round"] == 1  # nothing ran
