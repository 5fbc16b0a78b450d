"""A node gives one input per round index, and a decryptor one decryption (protocols/flower.md, section 5).

A malicious server reruns one round (the same session, or a new one for the same round index)
with different subsets of nodes. Each test runs the attack twice: against nodes whose record
is switched off (``forgetful``: ``SecureClient._once`` does nothing), where the server recovers
individual inputs, and against ordinary nodes, which refuse every rerun of a round they gave in.
"""

import itertools

import numpy as np
import pytest

import securefed as sf
from securefed.errors import ProtocolAborted
from securefed.flower.client import GIVEN_KEY, SecureClient
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

DEC = 2001  # the decryptor's node id
REFUSAL = "already gave its"


def updates(p, rnd):
    # float32 values: the model is float32, so the node's update is exactly this.
    return np.random.default_rng(100 + p).uniform(-1, 1, apps.dim()).astype(np.float32).astype(np.float64)


def decryptor_role(context):
    return {"decryptor"} if context.node_config.get("role") == "decryptor" else set()


@pytest.fixture(params=["forgetful", "ordinary"])
def forgetful(request, monkeypatch):
    """True: nodes keep no record of what they gave (the rule is off), as before the fix."""
    if request.param == "forgetful":
        monkeypatch.setattr(SecureClient, "_once", staticmethod(lambda *args, **kwargs: None))
    return request.param == "forgetful"


class Attack:
    """An in-process federation whose server delivers each run's messages only to the nodes it picks
    (the decryptor always), and keeps every node's reply."""

    def __init__(self, protocol, n, *, decryptor=False):
        self.protocol, self.decryptor = protocol, decryptor
        self.clients = list(apps.nodes(n))
        self.allowed: set[int] = set()
        self.replies: list[tuple[int, object]] = []
        nodes = {**apps.nodes(n), **({DEC: {"role": "decryptor"}} if decryptor else {})}
        app = apps.client_app(protocol, updates, auxiliary=decryptor_role if decryptor else ())
        self.grid = InProcessGrid(app, nodes, deliver=lambda node, msg: node == DEC or node in self.allowed,
                                  tamper=self._keep)

    def _keep(self, node, reply):
        self.replies.append((node, reply))
        return reply

    def run(self, subset, *, seed):
        """One run of round 1 delivered to clients `subset` (indices): the released total, or None if it aborted."""
        self.allowed = {self.clients[i] for i in subset}
        self.replies.clear()
        options = {"auxiliary": {"decryptor": DEC}} if self.decryptor else {}
        try:
            out = apps.run(apps.aggregator(self.protocol, **options), self.grid, self.clients, seed=seed)
        except ProtocolAborted:
            return None
        assert out.included_nodes == tuple(sorted(self.allowed))
        return out.result.total

    def refused(self):
        """The nodes that answered this run with the one-input-per-round refusal."""
        return {node for node, r in self.replies if r.has_error() and REFUSAL in r.error.reason}


def session_seed(session, k):
    return 3 if session == "same" else 3 + k  # the same session id each run, or a new one per run


@pytest.mark.parametrize("session", ["same", "new"])
@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_a_decryptor_decrypts_once_per_round_index(forgetful, scheme, session):
    """Decryptor mode: run k delivers the upload to client k only; a decryptor that signs a fresh key at
    every setup releases every input, one per run. With the rule, the reruns abort: it refuses setup."""
    protocol = (sf.protocols.CKKS if scheme == "ckks" else sf.protocols.BFV)(value_range=1.0)
    attack = Attack(protocol, 3, decryptor=True)
    released = [attack.run([k], seed=session_seed(session, k)) for k in range(3)]
    bound = protocol.error_bound(1)
    if forgetful:
        for k in range(3):  # every individual input
            np.testing.assert_allclose(released[k], updates(k, 1), rtol=0, atol=bound)
        return
    # min_clients=1 (the default) lets one run decrypt a single upload; the reruns release nothing.
    np.testing.assert_allclose(released[0], updates(0, 1), rtol=0, atol=bound)
    assert released[1:] == [None, None]
    assert attack.refused() == {DEC}
    given = attack.grid.context(DEC).state[GIVEN_KEY]
    assert given["decryptor/round"] == 1


@pytest.mark.parametrize("session", ["same", "new"])
@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_a_client_uploads_once_per_round_index_in_clients_mode(forgetful, scheme, session):
    """Clients mode with min_clients=2: runs over {0, 1}, {0, 2}, {0, 1, 2} (client 0 deals the key) give
    every input by differencing. With the rule, client 0 (and 1) refuse the reruns: they abort."""
    kind = sf.protocols.CKKS if scheme == "ckks" else sf.protocols.BFV
    protocol = kind(value_range=1.0, key_holder="clients", min_clients=2)
    attack = Attack(protocol, 3)
    subsets = [(0, 1), (0, 2), (0, 1, 2)]
    sums, refused = [], []
    for k, subset in enumerate(subsets):
        sums.append(attack.run(subset, seed=session_seed(session, k)))
        refused.append(attack.refused())
    bound = protocol.error_bound(3)
    if forgetful:
        s01, s02, s012 = sums
        x1, x2 = s012 - s02, s012 - s01
        for p, est in ((0, s01 - x1), (1, x1), (2, x2)):
            np.testing.assert_allclose(est, updates(p, 1), rtol=0, atol=4 * bound)
        return
    np.testing.assert_allclose(sums[0], updates(0, 1) + updates(1, 1), rtol=0, atol=bound)
    assert sums[1:] == [None, None]
    c = attack.clients
    assert refused == [set(), {c[0]}, {c[0], c[1]}]


@pytest.mark.parametrize("session", ["same", "new"])
def test_a_client_uploads_once_per_round_index_in_masked_bfv(forgetful, session):
    """Masked BFV (SecAgg+ inside, threshold t): runs over every t-subset of 3 clients give every input by
    least squares. With the rule only the first run releases anything."""
    protocol = sf.protocols.BFV(value_range=1.0, key_holder="masked")
    attack = Attack(protocol, 3, decryptor=True)
    t = protocol.min_survivors(3)
    assert t < 3
    subsets = list(itertools.combinations(range(3), t))
    sums, refused = [], []
    for k, subset in enumerate(subsets):
        sums.append(attack.run(subset, seed=session_seed(session, k)))
        refused.append(attack.refused())
    if forgetful:
        a = np.array([[1.0 if i in s else 0.0 for i in range(3)] for s in subsets])
        est, *_ = np.linalg.lstsq(a, np.array(sums), rcond=None)
        for p in range(3):
            np.testing.assert_allclose(est[p], updates(p, 1), rtol=0, atol=1e-3)
        return
    assert sums[0] is not None and all(s is None for s in sums[1:])
    # The decryptor refuses every rerun's setup, and so does each client that uploaded in the first run.
    c = attack.clients
    assert refused == [set()] + [{DEC} | {c[i] for i in s if i in subsets[0]} for s in subsets[1:]]


@pytest.mark.parametrize("session", ["same", "new"])
def test_secagg_plus_survivors_and_survivors_minus_one_give_nothing_by_difference(forgetful, session):
    """SecAgg+: a run over all clients and a rerun without client k would give x_k as the difference."""
    protocol = sf.protocols.SecAggPlus()
    attack = Attack(protocol, 4)
    full = attack.run(range(4), seed=session_seed(session, 0))
    minus = attack.run([0, 1, 2], seed=session_seed(session, 1))
    np.testing.assert_allclose(full, sum(updates(p, 1) for p in range(4)), rtol=0, atol=protocol.error_bound(4))
    if forgetful:
        np.testing.assert_allclose(full - minus, updates(3, 1), rtol=0, atol=2 * protocol.error_bound(4))
        return
    assert minus is None
    assert attack.refused() == set(attack.clients[:3])


def test_a_round_that_gave_nothing_can_be_rerun_and_an_older_round_is_refused():
    """Liveness where nothing was given: a run whose uploads never arrive (the decryptor only made a key,
    the clients only heard of the round) leaves every node free to take part in a rerun of that round.
    Rollback: after round 2, a node refuses round 1."""
    protocol = sf.protocols.CKKS(value_range=1.0)
    attack = Attack(protocol, 3, decryptor=True)
    assert attack.run([], seed=3) is None  # no upload delivered: aborted before the decryptor decrypts
    total = attack.run(range(3), seed=4)  # the same round index, a new session: everyone takes part
    np.testing.assert_allclose(total, sum(updates(p, 1) for p in range(3)), rtol=0, atol=protocol.error_bound(3))
    assert attack.refused() == set()
    attack.allowed = set(attack.clients)
    out = apps.run(apps.aggregator(protocol, auxiliary={"decryptor": DEC}), attack.grid, attack.clients,
                   round_index=2, seed=5)
    assert out.included_nodes == tuple(attack.clients)
    attack.replies.clear()
    with pytest.raises(ProtocolAborted):
        apps.run(apps.aggregator(protocol, auxiliary={"decryptor": DEC}), attack.grid, attack.clients,
                 round_index=1, seed=6)
    stale = {node for node, r in attack.replies if r.has_error() and "stale round 1" in r.error.reason}
    assert stale == {DEC}  # the decryptor refuses setup of round 1: nothing else runs


def test_a_node_does_not_answer_the_same_sessions_first_phase_twice_after_its_input():
    """Plain: the input phase is the first; the same session's upload again is a rerun, not a continuation."""
    protocol = sf.protocols.Plain()
    attack = Attack(protocol, 2)
    assert attack.run([0, 1], seed=3) is not None
    assert attack.run([0], seed=3) is None
    assert attack.refused() == {attack.clients[0]}


def test_the_input_phase_is_answered_once_per_round_index_even_without_saved_state(forgetful):
    """Decryptor mode: a client may start a round at its upload. Its record, not its saved state machine,
    stops a second upload of the same session (here the saved state is gone)."""
    from flwr.app import Context, Message, MetricRecord, RecordDict

    from securefed.flower import _envelope

    protocol = sf.protocols.CKKS(value_range=1.0)
    attack = Attack(protocol, 2, decryptor=True)
    captured = []
    attack.grid.deliver = lambda node, msg: captured.append(msg) if msg.metadata.message_type == "train" else True
    attack.run([], seed=3)  # the uploads go nowhere: capture them
    msg = next(m for m in captured if m.metadata.dst_node_id == apps.FIRST)

    def train(m, c):
        return Message(RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=m)

    client = SecureClient(protocol, seed=0)
    context = Context(run_id=1, node_id=apps.FIRST, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    assert not client.handle(msg, context, train).has_error()
    context.state.pop(_envelope.KEY)  # the round's state machine is gone (the record is not)
    second = client.handle(msg, context, train)
    assert second.has_error() != forgetful
    if not forgetful:
        assert REFUSAL in second.error.reason
