import numpy as np

from securefed.cli import main
from securefed.demo import digits_federation, dirichlet_split, run_demo


def test_plain_demo_reaches_85_percent_in_20_rounds():
    res = run_demo(rounds=20, protocol="plain", dp=False, progress=False)
    assert res.accuracy >= 0.85
    assert res.protocol == "plain" and res.rounds == 20


def test_split_is_non_iid_seeded_and_complete():
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_split(labels, 10, 0.5, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_split(labels, 10, 0.5, seed=3)]
    # non-IID: some client's label histogram is far from uniform
    hist = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    assert max(h.max() for h in hist) > 0.3


def test_digits_federation_holds_out_a_fifth():
    clients, test = digits_federation()
    assert len(clients) == 10 and len(test) == 1797 // 5
    assert sum(len(c) for c in clients) + len(test) == 1797


def test_cli_demo_prints_summary(capsys):
    assert main(["demo", "--rounds", "2", "--protocol", "plain", "--no-dp", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "round   2/2" in out and "test accuracy" in out and "plain" in out
