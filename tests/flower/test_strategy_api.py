"""SecureFedAvg as a Flower Strategy (issue 24, point 4): the interface, start()'s Flower arguments, and
composition with Flower's server optimizers (protocols/flower.md section 6)."""

import inspect
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, Strategy

import securefed as sf
from securefed import optim
from securefed.errors import ConfigurationError, InvalidInput
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.strategy import FlowerOptimizer
from securefed.flower.testing import InProcessGrid
from tests.flower import apps
from tests.flower.test_example_app import example, run  # noqa: F401 - the example app fixture
from tests.flower.test_resume import Crash, CrashingGrid, updates

N, ROUNDS = 4, 3
ADAM = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def strategy(**kw):
    return SecureFedAvg(protocol=kw.pop("protocol", sf.protocols.Plain()), seed=7,
                        phase_timeout=kw.pop("phase_timeout", 0.05), train_timeout=kw.pop("train_timeout", 0.05),
                        poll_interval=0.01, **kw)


def grid(protocol=None):
    return InProcessGrid(apps.client_app(protocol or sf.protocols.Plain(), updates), apps.nodes(N))


def test_secure_fedavg_is_a_flower_strategy_and_start_takes_flowers_arguments_in_flowers_order():
    assert isinstance(strategy(), Strategy)
    ours = list(inspect.signature(SecureFedAvg.start).parameters)
    assert ours == list(inspect.signature(Strategy.start).parameters)


def test_start_with_flowers_keywords_trains_and_timeout_caps_every_phase_for_that_run_only():
    ttls = []

    class Recording(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ttls.extend(m.metadata.ttl for m in messages)
            return super().push_messages(messages)

    s = strategy(phase_timeout=50.0, train_timeout=60.0)
    g = Recording(apps.client_app(sf.protocols.Plain(), updates), apps.nodes(N))
    res = s.start(grid=g, initial_arrays=apps.model(), num_rounds=2, timeout=0.5, train_config=ConfigRecord({"x": 1}),
                  evaluate_fn=lambda r, a: MetricRecord({"r": r}))
    assert ttls and max(ttls) < 50.0  # each message's ttl is its phase's wait plus a margin
    assert (s.aggregator.phase_timeout, s.aggregator.train_timeout) == (50.0, 60.0)
    assert [r.round for r in res.rounds] == [1, 2] and res.evaluate_metrics_serverapp[2]["r"] == 2
    np.testing.assert_allclose(apps.vector(res.arrays), 2.5 * (0.5 + 0.25))  # mean of (p + 1) 0.5^r over 4 nodes
    with pytest.raises(ConfigurationError, match="timeout"):
        s.start(g, apps.model(), num_rounds=1, timeout=0)


def test_max_payload_bytes_reaches_the_rounds_and_a_reply_over_it_is_rejected():
    """``SecureFedAvg(max_payload_bytes=)``, as ``GridAggregator``'s: every reply over it is rejected unparsed, so a
    run whose replies all exceed it releases no round; a bad value is refused up front."""
    res = strategy(max_payload_bytes=1 << 20).start(grid(), apps.model(), num_rounds=1)
    assert [r.round for r in res.rounds] == [1] and res.rounds[0].included
    tiny = strategy(max_payload_bytes=16)
    assert tiny.aggregator.max_payload_bytes == 16
    out = tiny.start(grid(), apps.model(), num_rounds=1)
    assert not any(r.included for r in out.rounds)
    np.testing.assert_array_equal(apps.vector(out.arrays), apps.vector(apps.model()))  # nothing released
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="max_payload_bytes"):
            strategy(max_payload_bytes=bad)


def test_federated_evaluation_is_refused_and_the_evaluate_views_are_empty():
    s = strategy()
    with pytest.raises(ConfigurationError, match="evaluate_config"):
        s.start(grid(), apps.model(), num_rounds=1, evaluate_config=ConfigRecord())
    assert s.configure_evaluate(1, apps.model(), ConfigRecord(), grid()) == []
    assert s.aggregate_evaluate(1, []) is None


def test_summary_logs_the_configuration(caplog):
    with caplog.at_level(logging.INFO, logger="securefed.flower"):
        strategy(server_optimizer=optim.FedAdam(**ADAM)).summary()
    assert "SecureFedAvg" in caplog.text and "FedAdam" in caplog.text and "Plain" in caplog.text


def test_configure_train_gives_the_first_exchange_of_a_round_to_the_sampled_nodes():
    g = grid()
    msgs = strategy().configure_train(2, apps.model(), ConfigRecord({"lr": 0.1}), g)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(g.get_node_ids())
    assert all(m.metadata.message_type == MessageType.TRAIN for m in msgs)  # Plain: the input phase comes first
    assert all(m.content["config"]["server-round"] == 2 and m.content["config"]["lr"] == 0.1 for m in msgs)
    assert all(m.content["securefed"]["round"] == 2 for m in msgs)
    secagg = strategy(protocol=sf.protocols.SecAgg()).configure_train(1, apps.model(), ConfigRecord(), g)
    assert secagg and all("arrays" not in m.content for m in secagg)  # key advertisement: no model yet
    assert strategy(min_available_nodes=N + 1, min_train_nodes=2).configure_train(1, apps.model(), ConfigRecord(),
                                                                                   g) == []
    dp = sf.privacy.CentralDP(noise_multiplier=1.0, clipping=1.0, delta=1e-5)
    with pytest.raises(ConfigurationError, match="privacy"):
        strategy(privacy=dp).configure_train(1, apps.model(), ConfigRecord(), g)


def _reply(arrays: ArrayRecord, mean: float) -> Message:
    moved = ArrayRecord({k: Array(a.numpy() + np.asarray(mean, a.numpy().dtype)) if k in ("w", "b") else a
                         for k, a in arrays.items()})
    return Message(RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def test_aggregate_train_steps_the_server_optimizer_on_the_released_mean():
    s, ref, w = strategy(server_optimizer=optim.FedAdam(**ADAM)), optim.FedAdam(**ADAM), apps.model(0.5)
    with pytest.raises(InvalidInput, match="configure_train first"):
        s.aggregate_train(1, [_reply(w, 0.25)])
    expected = apps.vector(w)
    for r in (1, 2):
        s.configure_train(r, w, ConfigRecord(), grid())
        w, metrics = s.aggregate_train(r, [_reply(w, 0.25)])
        expected = ref.step(expected, np.full(apps.dim(), 0.25), r).astype(np.float32)
        np.testing.assert_allclose(apps.vector(w), expected, rtol=1e-6)
        assert metrics is not None and metrics["num-examples"] == 1
    assert np.array_equal(w["steps"].numpy(), [7])  # the int array is left alone
    with pytest.raises(InvalidInput, match="one reply"):
        s.aggregate_train(3, [_reply(w, 0.1), _reply(w, 0.1)])


def test_a_flower_fedadam_composed_with_the_secure_round_equals_securefeds_fedadam():
    flower = strategy(server_optimizer=FedAdam(**ADAM)).start(grid(), apps.model(), num_rounds=ROUNDS)
    ours = strategy(server_optimizer=optim.FedAdam(**ADAM)).start(grid(), apps.model(), num_rounds=ROUNDS)
    np.testing.assert_allclose(apps.vector(flower.arrays), apps.vector(ours.arrays), rtol=1e-12, atol=0)
    assert not np.allclose(apps.vector(ours.arrays), 2.5 * sum(0.5**r for r in range(1, ROUNDS + 1)))  # not FedAvg


def test_flowers_fedadam_resumes_from_a_checkpoint_like_an_uninterrupted_run(tmp_path):
    def make(path):
        return strategy(server_optimizer=FedAdam(**ADAM), checkpoint_dir=path / "ckpt")

    (tmp_path / "ref").mkdir()
    ref = make(tmp_path / "ref").start(grid(), apps.model(), num_rounds=ROUNDS)
    g = CrashingGrid(apps.client_app(sf.protocols.Plain(), updates), apps.nodes(N), crash_at=(3, "upload"))
    with pytest.raises(Crash):
        make(tmp_path).start(g, apps.model(), num_rounds=ROUNDS)
    state, _, _, saved = _checkpoint.load_all(tmp_path / "ckpt")
    assert state["optimizer"]["config"] == {"optimizer": "flwr.FedAdam", **ADAM} and set(saved) == {"m_t", "v_t"}
    res = make(tmp_path).start(g, apps.model(), num_rounds=ROUNDS)
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


def test_flower_optimizer_state_round_trips_and_a_failed_step_changes_nothing():
    opt = FlowerOptimizer(FedAvgM(server_learning_rate=1.0, server_momentum=0.5))
    w = opt.step(np.zeros(3), np.ones(3), 1)
    state = opt.state_dict()
    assert set(state) == {"momentum_vector"}
    again = FlowerOptimizer(FedAvgM(server_learning_rate=1.0, server_momentum=0.5))
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.step(w, np.ones(3), 2), opt.step(w, np.ones(3), 2))
    huge = FlowerOptimizer(FedAvgM(server_learning_rate=1e300, server_momentum=0.5))
    with pytest.raises(InvalidInput):
        optim.step_in_dtype(huge, np.zeros(3, np.float32), np.ones(3), 1)
    assert huge.state_dict() == {}


def test_the_example_app_composes_secure_fedavg_with_flowers_fedadam(request, tmp_path):
    state = run(request.getfixturevalue("example"), tmp_path, dp=False,
                **{"num-server-rounds": 3, "server-optimizer": "fedadam"})
    assert state["optimizer"]["config"]["optimizer"] == "flwr.FedAdam"
    acc = [r["metrics"]["eval_accuracy"] for r in state["history"]]
    assert acc[-1] > 0.5 and acc[-1] > acc[0]  # 10 classes: chance is 0.1
