import numpy as np
import pytest
import torch

import securefed as sf
from securefed.encoding import flatten
from securefed.errors import ConfigurationError, InvalidInput
from tests._toy import federation, model


def params(m):
    return flatten(dict(m.named_parameters()))[0]


def test_fedavg_learns_and_records_history():
    data = federation()
    t = sf.Trainer(model(), data, eval_dataset=data[0], lr=0.2, local_epochs=2, progress=False, seed=1)
    h = t.fit(rounds=8)
    assert [r.round for r in h.rounds] == list(range(1, 9))
    assert h.rounds[-1].loss < h.rounds[0].loss
    assert h.rounds[-1].metrics["eval_accuracy"] > 0.6
    assert all(r.included == (0, 1, 2, 3) and r.epsilon is None for r in h.rounds)
    assert h.rounds[0].metrics["upload_bytes_per_client"] > 4 * params(t.model).size


def test_seeded_runs_are_reproducible():
    a = sf.Trainer(model(), federation(), clients_per_round=2, progress=False, seed=5).fit(3)
    b_trainer = sf.Trainer(model(), federation(), clients_per_round=2, progress=False, seed=5)
    b = b_trainer.fit(3)
    assert [r.included for r in a.rounds] == [r.included for r in b.rounds]
    assert [r.loss for r in a.rounds] == [r.loss for r in b.rounds]


def test_fedsgd_applies_the_example_weighted_mean_gradient_step():
    data = federation(sizes=(10, 30))
    m = model()
    start = params(m).astype(np.float64)
    expected = np.zeros_like(start)
    for d in data:  # one full-batch step per participant, weighted by its example count
        local = model()
        opt = torch.optim.SGD(local.parameters(), lr=0.1)
        x, y = d.tensors
        torch.nn.functional.cross_entropy(local(x), y).backward()
        opt.step()
        expected += len(d) * (params(local) - start)
    expected = start + expected / sum(len(d) for d in data)
    sf.Trainer(m, data, algorithm="fedsgd", lr=0.1, progress=False).fit(1)
    np.testing.assert_allclose(params(m), expected, atol=1e-6)


def test_dropouts_leave_the_dropped_participant_out():
    t = sf.Trainer(model(), federation(), progress=False,
                   dropouts=lambda r, ps: {ps[0]: "upload"} if r == 2 else {})
    h = t.fit(3)
    assert h.rounds[0].included == (0, 1, 2, 3)
    assert h.rounds[1].included == (1, 2, 3) and h.rounds[1].metrics["dropped"] == 1.0


def test_sampling_picks_clients_per_round_distinct_participants():
    h = sf.Trainer(model(), federation(), clients_per_round=3, progress=False, seed=2).fit(4)
    assert all(len(set(r.included)) == 3 for r in h.rounds)
    assert len({r.included for r in h.rounds}) > 1


def test_frozen_parameters_are_not_aggregated():
    m = model()
    m[0].weight.requires_grad_(False)
    before = m[0].weight.detach().clone()
    sf.Trainer(m, federation(), progress=False).fit(1)
    assert torch.equal(m[0].weight, before)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(algorithm="sgd"), ConfigurationError),
        (dict(clients_per_round=0), ConfigurationError),
        (dict(clients_per_round=5), ConfigurationError),
        (dict(weighting="size"), ConfigurationError),
    ],
)
def test_bad_configuration(kwargs, error):
    with pytest.raises(error):
        sf.Trainer(model(), federation(), progress=False, **kwargs)


def test_bad_inputs():
    with pytest.raises(InvalidInput):
        sf.Trainer(model(), [], progress=False)
    with pytest.raises(InvalidInput):
        sf.Trainer("not a model", federation(), progress=False)
    with pytest.raises(ConfigurationError):
        sf.Trainer(model(), federation(), progress=False).fit(0)


def test_torch_threads_are_set_for_training_and_restored():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 3)

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.lin(x)

    before = torch.get_num_threads()
    sf.Trainer(Probe(), federation(), progress=False).fit(1)  # small model: one thread
    assert set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    sf.Trainer(Probe(), federation(), progress=False, torch_threads=2).fit(1)
    assert set(seen) == {2} and torch.get_num_threads() == before
    with pytest.raises(ConfigurationError):
        sf.Trainer(Probe(), federation(), progress=False, torch_threads=0)
