"""The loopback federation harness: loopback only, refused failures, and no process left behind."""

import os
from pathlib import Path

import pytest

from securefed.errors import ConfigurationError
from securefed.flower.loopback import LoopbackFederation, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Boom(Exception):
    pass


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_every_process_is_killed_by_pid_when_the_block_fails(tmp_path):
    fed = LoopbackFederation(tmp_path / "fed", num_nodes=1, auth=False)
    seen = set()
    with pytest.raises(Boom), fed:
        seen = fed.pids()
        assert len(seen) >= 4  # SuperLink, its SuperExec, the SuperNode, its SuperExec
        assert {host for host, _ in fed.listening()} == {"127.0.0.1"}
        assert fed.env["FLWR_HOME"].startswith(str(tmp_path))
        assert fed.env["FLWR_TELEMETRY_ENABLED"] == "0" and fed.env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
        raise Boom
    assert not fed.pids()
    assert not [pid for pid in seen if alive(pid)]


def test_bad_settings_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigurationError, match="TLS"):
        LoopbackFederation(tmp_path / "a", num_nodes=1, tls=False, auth=True)
    with pytest.raises(ConfigurationError, match="node configs"):
        LoopbackFederation(tmp_path / "b", num_nodes=2, node_configs=[{}])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(ConfigurationError, match="not empty"):
        LoopbackFederation(tmp_path / "c", num_nodes=1).start()
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < 65536 for p in ports)
    assert os.environ.get("FLWR_HOME") != str(tmp_path)


def test_setup_ahead_two_messages_per_round_on_loopback(tmp_path):
    """The bench's securefed app (SecAgg+, 3 rounds, each carrying the next round's setup) on real processes:
    4 messages per node in round 1, then 2 per round, and every round's sum within the protocol's bound."""
    import json
    from pathlib import Path

    app = Path(__file__).resolve().parents[2] / "bench" / "flower_apps" / "securefed"
    n = 3
    nodes = [{"partition-id": i, "num-partitions": n, "degree": 2} for i in range(n)]
    out = tmp_path / "out.json"
    with LoopbackFederation(tmp_path / "fed", num_nodes=n, node_configs=nodes) as fed:
        run_id = fed.run(app, {"num-nodes": n, "dim": 1000, "degree": 2, "rounds": 3, "ahead": 1, "timeout": 60.0,
                               "out": str(out)})
        status = fed.wait(run_id, timeout=240)
        assert status["status"] == "finished:completed", fed.run_log(run_id)[-3000:]
    result = json.loads(out.read_text())
    assert list(result["messages_per_node"].values()) == [4 + 2 + 2] * n
    assert result["included"] == n
    assert result["max_abs_error"] <= result["error_bound"]


def test_active_rounds_attest_the_model_over_real_processes(tmp_path):
    """Active SecAgg+ with identity keys on real processes (TLS, node auth): every node's model attestation,
    made from the model, config and run config it received over gRPC, checks out at the server (given the
    run config) and at every other node, so rounds complete with every node included (protocols/flower.md
    section 1; proofs/flower.md Lemma F17)."""
    import json

    from cryptography.hazmat.primitives import serialization

    from securefed.crypto.random import RandomSource
    from securefed.crypto.signing import generate_signing_key, verify_key_bytes

    app = Path(__file__).resolve().parents[2] / "bench" / "flower_apps" / "securefed"
    n = 3
    keyfile = tmp_path / "identities.json"
    nodes = [{"partition-id": i, "num-partitions": n, "degree": 2, "identities": str(keyfile)} for i in range(n)]
    out = tmp_path / "out.json"
    with LoopbackFederation(tmp_path / "fed", num_nodes=n, node_configs=nodes) as fed:
        table = {}
        for node in fed.node_ids.values():  # keys by node id, known once the nodes are registered
            key = generate_signing_key(RandomSource())
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            table[str(node)] = [verify_key_bytes(key).hex(), raw.hex()]
        keyfile.write_text(json.dumps(table))
        run_id = fed.run(app, {"num-nodes": n, "dim": 1000, "degree": 2, "rounds": 2, "ahead": 1, "timeout": 60.0,
                               "out": str(out), "identities": str(keyfile)})
        status = fed.wait(run_id, timeout=240)
        assert status["status"] == "finished:completed", fed.run_log(run_id)[-3000:]
    result = json.loads(out.read_text())
    assert result["protocol"]["adversary"] == "active"
    assert result["included"] == n
    assert result["max_abs_error"] <= result["error_bound"]

