import pytest

from tests.audit.helpers import write_log


@pytest.fixture(scope="module")
def plain_log(tmp_path_factory):
    """A complete 3-round Plain log (participants 7, 3, 9, 4; 3 drops out of round 2). Read only."""
    path = tmp_path_factory.mktemp("audit") / "run.jsonl"
    write_log(path, rounds=3, dropouts={2: {1: "upload"}}, participants=[7, 3, 9, 4])
    return path


@pytest.fixture(scope="module")
def dp_log(tmp_path_factory):
    """A complete 6-round Plain log with Gaussian DP events whose claimed epsilons are the true ones. Read only."""
    from securefed.privacy.accountant import Accountant
    from securefed.privacy.events import GaussianEvent

    acc = Accountant("rdp")

    def dp(r):
        event = GaussianEvent(noise_multiplier=1.1, sampling_rate=0.5, round=r, num_clients=5)
        acc.record(event)
        return [event.to_dict()], acc.epsilon(1e-5)

    path = tmp_path_factory.mktemp("audit") / "dp.jsonl"
    write_log(path, rounds=6, n=5, privacy={"accountant": "rdp", "delta": 1e-5}, dp=dp,
              dropouts={3: {0: "upload", 4: "upload"}})
    return path
