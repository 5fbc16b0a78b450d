"""The example app on a real Flower deployment: a SuperLink and 5 SuperNodes on 127.0.0.1, TLS, node authentication.

Three rounds of SecAgg+ training with distributed DP; one node is SIGKILLed during round 2's
masked-input phase. Every round must finish with the expected participants, and the final
model must equal the one the same app computes in a single process with the same seeds and
the same dropout. A node whose key was never registered is refused. Every process started
is killed by PID at the end, also when the test fails.
"""

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from securefed.audit import verify
from securefed.flower import _checkpoint
from securefed.flower.aggregation import message_type
from securefed.flower.loopback import LoopbackFederation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES, VICTIM = 5, 2  # the node with partition 2 dies in round 2


def app_defaults():
    """The run configuration in the app's pyproject.toml (Flower fuses overrides into it)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: Flower depends on tomli
        import tomli as tomllib

    return tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


#: Each node's own settings (its --node-config): seeded, for the comparison with one process. The run
#: configuration carries the server's copy; nodes never read it for their security.
NODE_SETTINGS = {"seed": 7, "dp": True, "num-nodes": NODES}


def node_config(partition):
    return {"partition-id": partition, "num-partitions": NODES, **NODE_SETTINGS}


def run_config(tmp_path, name):
    return {
        "num-server-rounds": 3, "min-nodes": 2, **NODE_SETTINGS,
        # Generous for 2 busy cores; only the killed node's phase waits the whole phase-timeout.
        "phase-timeout": 45.0, "train-timeout": 45.0,
        "checkpoint-dir": str(tmp_path / name / "ckpt"), "audit-log": str(tmp_path / name / "audit.jsonl"),
    }


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def federation(tmp_path):
    fed = LoopbackFederation(tmp_path / "fed", num_nodes=NODES, node_configs=[node_config(p) for p in range(NODES)])
    try:
        fed.start()
        yield fed
    finally:
        fed.close()
        assert not fed.pids(), "processes left running"


def in_process_reference(tmp_path, cfg, node_ids, victim, protocol, run_id):
    """The same app, seeds, run id and dropout, every party in this process (Flower's simulation without Ray);
    seeded nodes bind the run id into their randomness."""
    sys.path.insert(0, str(APP))
    try:
        from flwr.app import Context, RecordDict
        from securefed_app import client_app, server_app

        from securefed.flower.testing import InProcessGrid

        masked = protocol.phases.index("masked_input")

        def deliver(node, msg):
            rec = msg.content["securefed"]
            dead = rec["round"] > 2 or (rec["round"] == 2 and protocol.phases.index(rec["phase"]) >= masked)
            return not (node == victim and dead)

        nodes = {v: node_config(p) for p, v in node_ids.items()}
        cfg = {**app_defaults(), **cfg}
        grid = InProcessGrid(client_app.app, nodes, run_config=cfg, deliver=deliver, run_id=run_id)
        server_app.app(grid, Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=cfg))
    finally:
        sys.path.remove(str(APP))


def test_three_rounds_of_secagg_plus_across_processes_survive_a_killed_node(federation, tmp_path):
    fed = federation
    assert {host for host, _ in fed.listening()} == {"127.0.0.1"}
    rogue = fed.start_node(NODES, register=False, node_config=node_config(0), name="rogue")
    cfg = run_config(tmp_path, "deployed")
    (tmp_path / "deployed").mkdir()
    run_id = fed.run(APP, cfg)

    # Kill the victim's SuperNode (and its process group) as round 2's masked-input request reaches it.
    sys.path.insert(0, str(APP))
    from securefed_app import task

    sys.path.remove(str(APP))
    protocol = task.protocol(cfg)
    received = re.compile(r"ROUND 2\][^\n]*\n[^\n]*Receiving: " + re.escape(message_type(protocol, "masked_input")))
    wait_for(lambda: received.search(fed.log(f"node-{VICTIM}")), 300, "round 2's masked input at the victim")
    fed.kill(f"node-{VICTIM}")

    status = fed.wait(run_id, timeout=300)
    assert status["status"] == "finished:completed", fed.run_log(run_id)[-5000:]

    # The unregistered node was refused: it exited with an error and never took part.
    wait_for(lambda: rogue.poll() is not None, 60, "the unregistered node to give up")
    assert rogue.returncode != 0
    assert "Failed to" in fed.log("rogue")

    state, arrays, _ = _checkpoint.load(tmp_path / "deployed" / "ckpt")
    ids = fed.node_ids
    everyone = tuple(sorted(ids.values()))
    victim = ids[VICTIM]
    survivors = tuple(v for v in everyone if v != victim)
    rounds = [(r["round"], tuple(r["participants"]), tuple(r["included"]),
               {int(v): tuple(d[:2]) for v, d in r["dropped"].items()}) for r in state["history"]]
    assert rounds == [
        (1, everyone, everyone, {}),
        (2, everyone, survivors, {victim: ("masked_input", "no_reply")}),  # silence, or Flower's "node unavailable"
        (3, survivors, survivors, {}),
    ]
    assert [(e["round"], e["num_clients"]) for e in state["ledger"]] == [(1, 5), (2, 4), (3, 4)]
    audit = verify(tmp_path / "deployed" / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()
    assert audit.rounds == 3 and audit.epsilon == pytest.approx(state["history"][-1]["epsilon"])

    # The same seeds and dropout in one process give the very same model.
    ref_cfg = run_config(tmp_path, "reference")
    (tmp_path / "reference").mkdir()
    in_process_reference(tmp_path, ref_cfg, ids, victim, protocol, int(run_id))
    ref_state, ref_arrays, _ = _checkpoint.load(tmp_path / "reference" / "ckpt")
    assert [r["included"] for r in ref_state["history"]] == [r["included"] for r in state["history"]]
    assert list(arrays) == list(ref_arrays)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name].numpy(), ref_arrays[name].numpy(), err_msg=name)
    print(json.dumps({"rounds": state["history"][-1]["round"], "epsilon": state["history"][-1]["epsilon"]}))
