"""securefed.optim against Flower's own strategies (flwr.serverapp.strategy), and its checks.

Flower is driven through the calls its ``Strategy.start`` makes each round: ``configure_train``
(which records the current arrays) and ``aggregate_train`` on one reply whose arrays are
``current + mean_update``; the returned arrays are the next round's model.
"""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed import optim
from securefed.errors import ConfigurationError, InvalidInput

LAYERS = {"conv": (2, 3), "bias": (3,), "fc": (4,)}  # Flower keeps one array per layer; we keep the concatenation
NAMES = ("FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad")
SERVER_PARAMS = {"FedAvg": set(), "FedAvgM": {"server_learning_rate", "server_momentum"},
                 "FedAdam": {"eta", "beta_1", "beta_2", "tau"}, "FedYogi": {"eta", "beta_1", "beta_2", "tau"},
                 "FedAdagrad": {"eta", "tau"}}
CASES = [
    ("FedAvg", {}),
    ("FedAvgM", {}),
    ("FedAvgM", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    ("FedAvgM", {"server_learning_rate": 2.0}),
    ("FedAvgM", {"server_momentum": 0.5}),
    ("FedAdam", {}),
    ("FedAdam", {"eta": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
    ("FedAdam", {"eta": 0.2, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-6}),
    ("FedYogi", {}),
    ("FedYogi", {"eta": 0.05, "beta_1": 0.0, "beta_2": 0.5, "tau": 1e-4}),
    ("FedAdagrad", {}),
    ("FedAdagrad", {"eta": 0.2, "tau": 1e-2}),
]


def _flower():
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    from flwr.supercore.task_identity import TaskIdentity

    # Flower builds messages with the process's task identity, as in a ServerApp process (and as
    # securefed.flower.testing.InProcessGrid sets it).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    return strategy


class _Grid:
    """All that configure_train asks of a grid."""

    def get_node_ids(self):
        return [1, 2]


def _layers(flat: np.ndarray, shapes=LAYERS) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k, shape in shapes.items():
        n = int(np.prod(shape))
        out[k] = flat[i:i + n].reshape(shape)
        i += n
    return out


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a.numpy() if hasattr(a, "numpy") else a).ravel() for a in arrays.values()])


def _flower_rounds(strategy, start: np.ndarray, updates, rounds, shapes=LAYERS) -> list[np.ndarray]:
    """The model after each round, as Flower's strategy computes it (a list of flat float64 vectors)."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )

    arrays = ArrayRecord({k: Array(v.copy()) for k, v in _layers(start, shapes).items()})
    out = []
    for r, u in zip(rounds, updates, strict=True):
        list(strategy.configure_train(r, arrays, ConfigRecord(), _Grid()))
        current = {k: a.numpy() for k, a in arrays.items()}
        trained = {k: Array(current[k] + du) for k, du in _layers(u, shapes).items()}
        reply = Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 1})}),
                        dst_node_id=1, message_type=MessageType.TRAIN)
        arrays, _ = strategy.aggregate_train(r, [reply])
        out.append(_flat(arrays))
    return out


def _given(seed: int = 7, rounds: int = 5):
    rng = np.random.default_rng(seed)
    dim = sum(int(np.prod(s)) for s in LAYERS.values())
    start = rng.normal(0.0, 1.0, dim)
    updates = [rng.normal(0.0, 0.1, dim) * (1.0 + r) for r in range(rounds)]
    updates[2][3] = 0.0  # a coordinate that does not move this round (Yogi's sign(0))
    return start, updates


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("first_round", [1, 4])
def test_matches_flower_over_five_rounds(name, kwargs, first_round):
    """Acceptance: each optimizer matches Flower's class to 1e-6 relative over 5 rounds of given mean updates."""
    flwr_strategy = _flower()
    start, updates = _given()
    rounds = list(range(first_round, first_round + 5))
    expected = _flower_rounds(getattr(flwr_strategy, name)(**kwargs), start, updates, rounds)
    ours, w = getattr(optim, name)(**kwargs), start
    for r, u, want in zip(rounds, updates, expected, strict=True):
        w = ours.step(w, u, r)
        np.testing.assert_allclose(w, want, rtol=1e-6, atol=0, err_msg=f"{name} round {r}")
    assert not np.allclose(expected[-1], start)  # the rounds moved the model


@pytest.mark.parametrize("name", NAMES)
def test_names_and_defaults_are_flowers(name):
    flwr_strategy = _flower()
    theirs = inspect.signature(getattr(flwr_strategy, name)).parameters
    ours = inspect.signature(getattr(optim, name)).parameters
    assert set(ours) == SERVER_PARAMS[name]  # Flower's other parameters are about sampling and records
    for p in ours.values():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.name in theirs and p.default == theirs[p.name].default, (name, p.name)


def _settings(name: str):
    rate = st.floats(1e-3, 1.0)
    beta = st.floats(0.0, 0.999)
    if name == "FedAdagrad":
        return st.fixed_dictionaries({"eta": rate, "tau": st.floats(1e-6, 1.0)})
    return st.fixed_dictionaries({"eta": rate, "beta_1": beta, "beta_2": beta, "tau": st.floats(1e-6, 1.0)})


@st.composite
def _runs(draw, name: str):
    shapes = {f"l{i}": (draw(st.integers(1, 4)), draw(st.integers(1, 3))) for i in range(draw(st.integers(1, 3)))}
    dim = sum(a * b for a, b in shapes.values())
    floats = st.floats(-1.0, 1.0, allow_subnormal=False)
    start = np.array(draw(st.lists(floats, min_size=dim, max_size=dim))) * 10.0 ** draw(st.integers(-3, 3))
    rounds = draw(st.integers(1, 5))
    updates = [np.array(draw(st.lists(floats, min_size=dim, max_size=dim))) * 10.0 ** draw(st.integers(-6, 2))
               for _ in range(rounds)]
    first = draw(st.integers(1, 50))
    return shapes, start, updates, list(range(first, first + rounds)), draw(_settings(name))


@pytest.mark.parametrize("name", ["FedAdam", "FedYogi", "FedAdagrad"])
@given(data=st.data())
def test_matches_flower_on_random_updates(name, data):
    """Random layer shapes, magnitudes, settings and rounds. Ours gets the delta Flower sees,
    ``(w + u) - w`` in floating point, so the comparison is of the update rule alone."""
    flwr_strategy = _flower()
    shapes, start, updates, rounds, kwargs = data.draw(_runs(name))
    ours, w = getattr(optim, name)(**kwargs), start
    for r, u in zip(rounds, updates, strict=True):
        w = ours.step(w, (w + u) - w, r)
    expected = _flower_rounds(getattr(flwr_strategy, name)(**kwargs), start, updates, rounds, shapes)
    np.testing.assert_allclose(w, expected[-1], rtol=1e-6, atol=0)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_state_dict_resumes_exactly(name, kwargs, tmp_path):
    """Two rounds, state saved with numpy (no pickle) and loaded into a new optimizer, three more rounds:
    the same floats as five rounds uninterrupted."""
    start, updates = _given(seed=3)
    a, w = getattr(optim, name)(**kwargs), start
    for r, u in enumerate(updates, 1):
        w = a.step(w, u, r)
    b, v = getattr(optim, name)(**kwargs), start
    for r, u in enumerate(updates[:2], 1):
        v = b.step(v, u, r)
    buf = io.BytesIO()
    np.savez(buf, **b.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        state = {k: npz[k] for k in npz.files}
    c = getattr(optim, name)(**kwargs)
    c.load_state_dict(state)
    for r, u in enumerate(updates[2:], 3):
        v = c.step(v, u, r)
    assert np.array_equal(v, w)
    assert sorted(state) == sorted(c.state_dict())
    assert c.describe() == a.describe() and c.describe()["optimizer"] == name


def test_state_names():
    assert optim.FedAvg().state_dict() == {}
    w, u = np.zeros(3), np.ones(3)
    adam = optim.FedAdam()
    assert adam.state_dict() == {}
    adam.step(w, u, 1)
    assert sorted(adam.state_dict()) == ["m_t", "v_t"]
    m = optim.FedAvgM(server_momentum=0.9)
    m.step(w, u, 1)
    assert np.array_equal(m.state_dict()["momentum_vector"], -u)  # Flower's sign: a pseudo-gradient
    plain = optim.FedAvgM(server_learning_rate=0.5)
    plain.step(w, u, 1)
    assert plain.state_dict() == {}


def test_describe_is_settings():
    assert optim.FedAdam().describe() == {"optimizer": "FedAdam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99,
                                          "tau": 1e-3}
    assert optim.FedAdagrad(eta=0.5).describe() == {"optimizer": "FedAdagrad", "eta": 0.5, "tau": 1e-3}
    assert optim.FedAvgM().describe() == {"optimizer": "FedAvgM", "server_learning_rate": 1.0,
                                          "server_momentum": 0.0}
    assert optim.FedAvg().describe() == {"optimizer": "FedAvg"}
    assert repr(optim.FedYogi(eta=0.5)) == "FedYogi(eta=0.5, beta_1=0.9, beta_2=0.99, tau=0.001)"


BAD_RATES = [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None]
BAD_BETAS = [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, None]


@pytest.mark.parametrize("bad", BAD_RATES)
@pytest.mark.parametrize(("name", "param"), [("FedAvgM", "server_learning_rate"), ("FedAdam", "eta"),
                                             ("FedAdam", "tau"), ("FedYogi", "eta"), ("FedYogi", "tau"),
                                             ("FedAdagrad", "eta"), ("FedAdagrad", "tau")])
def test_bad_rates(name, param, bad):
    with pytest.raises(ConfigurationError, match=param):
        getattr(optim, name)(**{param: bad})


@pytest.mark.parametrize("bad", BAD_BETAS)
@pytest.mark.parametrize(("name", "param"), [("FedAvgM", "server_momentum"), ("FedAdam", "beta_1"),
                                             ("FedAdam", "beta_2"), ("FedYogi", "beta_1"), ("FedYogi", "beta_2")])
def test_bad_betas(name, param, bad):
    with pytest.raises(ConfigurationError, match=param):
        getattr(optim, name)(**{param: bad})


def test_keyword_only():
    with pytest.raises(TypeError):
        optim.FedAdam(0.1)  # type: ignore[misc]


@pytest.mark.parametrize(("weights", "update", "rnd"), [
    (np.zeros(3), np.zeros(3), 0),
    (np.zeros(3), np.zeros(3), True),
    (np.zeros(3), np.zeros(3), 1.5),
    (np.zeros(3), np.zeros(4), 1),
    (np.zeros((3, 1)), np.zeros((3, 1)), 1),
    (np.zeros(0), np.zeros(0), 1),
    (np.zeros(3), np.array([0.0, np.nan, 0.0]), 1),
    (np.array([np.inf, 0.0, 0.0]), np.zeros(3), 1),
    (np.zeros(3), np.array(["a", "b", "c"]), 1),
    # were numpy's ValueError (ragged), UnicodeDecodeError (bytes) and torch's RuntimeError (issue 21, fuzz)
    (np.zeros(3), [[1.0], [1.0, 2.0]], 1),
    (["a", b"\xbf"], np.zeros(2), 1),
])
@pytest.mark.parametrize("name", NAMES)
def test_bad_step_inputs(name, weights, update, rnd):
    with pytest.raises(InvalidInput):
        getattr(optim, name)().step(weights, update, rnd)


@pytest.mark.parametrize("name", NAMES)
def test_torch_tensors_step_like_their_values(name):
    torch = pytest.importorskip("torch")
    w, u = np.linspace(-1.0, 1.0, 4), np.full(4, 0.1)
    expected = getattr(optim, name)().step(w, u, 1)
    got = getattr(optim, name)().step(torch.tensor(w, requires_grad=True), torch.tensor(u, requires_grad=True), 1)
    assert np.array_equal(got, expected)
    with pytest.raises(InvalidInput, match="numpy cannot read"):
        getattr(optim, name)().step(torch.tensor(w).to(torch.bfloat16), u, 1)
    for junk in (torch.device("cpu"), torch.nn.Linear(2, 2)):  # torch objects that are not tensors
        with pytest.raises(InvalidInput):
            getattr(optim, name)().step(junk, u, 1)


def test_failed_step_changes_nothing():
    opt = optim.FedAvgM(server_learning_rate=1e300, server_momentum=0.5)
    w = np.ones(2)
    opt.step(w, np.ones(2), 1)
    before = opt.state_dict()
    with pytest.raises(InvalidInput, match="inf or NaN"):
        opt.step(np.full(2, 1e300), np.full(2, 1e10), 2)
    assert before.keys() == opt.state_dict().keys()
    assert all(np.array_equal(before[k], opt.state_dict()[k]) for k in before)


def test_state_of_another_model_is_refused():
    opt = optim.FedAdam()
    opt.step(np.zeros(3), np.ones(3), 1)
    with pytest.raises(InvalidInput, match="another model"):
        opt.step(np.zeros(4), np.ones(4), 2)


@pytest.mark.parametrize("state", [
    {"m_t": np.zeros(3)},
    {"m_t": np.zeros(3), "v_t": np.zeros(3), "x": np.zeros(3)},
    {"m_t": np.zeros(3), "v_t": np.zeros(2)},
    {"m_t": np.zeros(3), "v_t": -np.ones(3)},
    {"m_t": np.zeros(3), "v_t": np.full(3, np.nan)},
    {"momentum_vector": np.zeros(3)},
    [("m_t", np.zeros(3))],
])
def test_bad_state_is_refused(state):
    opt = optim.FedAdam()
    with pytest.raises(InvalidInput):
        opt.load_state_dict(state)
    assert opt.state_dict() == {}


def test_resolve():
    w, u = np.arange(3.0), np.ones(3)
    assert isinstance(optim.resolve(None), optim.FedAvg)
    half = optim.resolve(None, 0.5)
    assert np.array_equal(half.step(w, u, 1), w + 0.5 * u)  # the Trainer's server_lr step
    adam = optim.FedAdam()
    assert optim.resolve(adam, 1.0) is adam
    with pytest.raises(ConfigurationError, match="not both"):
        optim.resolve(adam, 0.5)
    with pytest.raises(ConfigurationError, match="server_optimizer"):
        optim.resolve("adam")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="server_lr"):
        optim.resolve(None, -1.0)
    assert all(isinstance(getattr(optim, n)(), optim.ServerOptimizer) for n in NAMES)


def test_import_needs_no_torch():
    code = "import sys, securefed.optim, securefed as sf; sf.optim.FedAdam(); assert 'torch' not in sys.modules"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
