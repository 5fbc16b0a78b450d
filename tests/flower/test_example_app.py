"""The example app (examples/flower-app) in one process: SecAgg+ with distributed DP, checkpoints, audit log."""

import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from securefed.audit import verify
from securefed.flower import _checkpoint
from securefed.flower.testing import InProcessGrid

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(APP))
    try:
        from securefed_app import client_app, server_app, task

        yield client_app, server_app, task
    finally:
        sys.path.remove(str(APP))


NODE_SETTINGS = ("seed", "dp", "num-nodes")  # each node's own (node_config); the server has its copy in run_config


def run(example, tmp_path, **overrides):
    client_app, server_app, _ = example
    cfg = {"num-server-rounds": 2, "seed": 1, "min-nodes": 2, "dp": True, "num-nodes": 3, "phase-timeout": 0.05,
           "train-timeout": 0.05, "local-epochs": 2, "batch-size": 16, "lr": 0.1,
           "checkpoint-dir": str(tmp_path / "ckpt"), "audit-log": str(tmp_path / "audit.jsonl"), **overrides}
    mine = {k: cfg[k] for k in NODE_SETTINGS}  # the nodes seeded by their own settings (a test run)
    grid = InProcessGrid(client_app.app,
                         {11 + p: {"partition-id": p, "num-partitions": 3, **mine} for p in range(3)}, run_config=cfg)
    server_app.app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg))
    return _checkpoint.load(tmp_path / "ckpt")[0]


def test_the_example_trains_with_secagg_plus_and_distributed_dp(example, tmp_path):
    state = run(example, tmp_path)
    assert [len(r["included"]) for r in state["history"]] == [3, 3]
    assert [e["mechanism"] for e in state["ledger"]] == ["ddg", "ddg"]
    eps = [r["epsilon"] for r in state["history"]]
    assert 0 < eps[0] < eps[1]
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()
    assert audit.epsilon == pytest.approx(eps[1])
    assert {r["protocol"]["protocol"] for r in audit_rounds(tmp_path)} == {"secagg+"}


def test_the_example_without_dp_learns(example, tmp_path):
    state = run(example, tmp_path, dp=False, **{"num-server-rounds": 3})
    acc = [r["metrics"]["eval_accuracy"] for r in state["history"]]
    assert acc[-1] > 0.5 and acc[-1] > acc[0]  # 10 classes: chance is 0.1
    assert state["ledger"] == []
    # Without DP the example also evaluates on the nodes' own data, securely aggregated: the example-weighted
    # mean of the nodes' accuracies of the released model (recomputed here in the clear from the partitions).
    _, _, task = example
    fed = [r["metrics"]["federated_accuracy"] for r in state["history"]]
    assert all(r["metrics"]["federated_included"] == 3 for r in state["history"]) and fed[-1] > fed[0]
    net = task.model()
    net.load_state_dict(_checkpoint.load(tmp_path / "ckpt")[1].to_torch_state_dict())
    parts = [task.data(p, 3)[0] for p in range(3)]
    clear = sum(task.evaluate(net, d)["accuracy"] * len(d) for d in parts) / sum(len(d) for d in parts)
    assert fed[-1] == pytest.approx(clear, abs=1e-5)
    assert "federated_accuracy" not in run(example, tmp_path / "dp")["history"][0]["metrics"]  # none with DP


def test_the_example_uses_the_demos_data(example):
    import torch

    from securefed.demo import digits_federation

    _, _, task = example
    datasets, test = digits_federation(clients=3, seed=0)
    for p in range(3):
        mine, held_out = task.data(p, 3)
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors, datasets[p].tensors))
        assert all(torch.equal(a, b) for a, b in zip(held_out.tensors, test.tensors))


def audit_rounds(tmp_path):
    import json

    return [json.loads(line)["body"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "round"]
