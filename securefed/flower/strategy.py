"""FedAvg on Flower where the server learns only the aggregate: the strategy users put in their ``ServerApp``.

Each round: sample nodes, run one securefed aggregation round over the grid (the
nodes train in its input phase), apply the mean update, evaluate, checkpoint, and
record the round in the audit log. A restarted run continues from the checkpoint.
See ``protocols/flower.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from securefed import optim
from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.errors import AbortReason, ConfigurationError, InvalidInput, ProtocolAborted
from securefed.flower import _checkpoint, _envelope, _evaluation, _identities, _model, _privacy, _resume
from securefed.flower.aggregation import (
    AggregationRound,
    GridAggregator,
    RoundOutcome,
    evaluation_protocol,
    input_phase,
)
from securefed.protocols.base import (
    AggregationProtocol,
    DropReason,
    DropRecord,
)
from securefed.rounds import RoundEngine

if TYPE_CHECKING:
    from securefed.privacy.mechanisms import Privacy

__all__ = ["FlowerOptimizer", "RoundReport", "SecureFedAvg", "SecureResult"]

log = logging.getLogger("securefed.flower")

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """One round on Flower.

    ``participants``: the node ids asked to take part; ``included``: those whose update
    is in the aggregate; ``dropped``: node id to the phase and reason it left;
    ``aborted``: the abort reason when the round released nothing (model unchanged);
    ``metrics``: the server's evaluation and the round's statistics.
    """

    round: int
    participants: tuple[int, ...]
    included: tuple[int, ...]
    dropped: dict[int, DropRecord]
    metrics: dict[str, float]
    epsilon: float | None = None
    aborted: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round, "participants": list(self.participants), "included": list(self.included),
            "dropped": {str(v): [d.phase, d.reason.value, d.detail] for v, d in self.dropped.items()},
            "metrics": self.metrics, "epsilon": self.epsilon, "aborted": self.aborted,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundReport:
        return cls(
            data["round"], tuple(data["participants"]), tuple(data["included"]),
            {int(v): DropRecord(p, DropReason(r), d) for v, (p, r, d) in data["dropped"].items()},
            dict(data["metrics"]), data["epsilon"], data["aborted"],
        )


@dataclasses.dataclass
class SecureResult(Result):
    """Flower's ``Result`` plus securefed's report of every round (``rounds``)."""

    rounds: list[RoundReport] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _RunState:
    """What a checkpoint holds besides the model."""

    round: int = 0
    cooldown: dict[int, int] = dataclasses.field(default_factory=dict)
    history: list[RoundReport] = dataclasses.field(default_factory=list)
    ledger: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the accountant's, with privacy
    audit: dict[str, Any] | None = None  # the committed round's audit record, until the log has it
    privacy: dict[str, Any] | None = None  # the session's population and adaptive clip, with privacy

    def to_json(self) -> dict[str, Any]:
        out = {"cooldown": {str(k): v for k, v in self.cooldown.items()},
               "history": [r.to_json() for r in self.history], "ledger": self.ledger, "audit": self.audit}
        if self.privacy is not None:  # absent without privacy: such checkpoints read as before
            out["privacy"] = self.privacy
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _RunState:
        try:
            return cls(data["round"], {int(k): v for k, v in data["cooldown"].items()},
                       [RoundReport.from_json(r) for r in data["history"]], list(data["ledger"]), data["audit"],
                       None if data.get("privacy") is None else dict(data["privacy"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigurationError(f"the checkpoint's state is malformed ({type(e).__name__}: {e}); "
                                     "restore the files the server wrote") from None


class SecureFedAvg(Strategy):
    """Federated averaging over a Flower grid through a securefed aggregation protocol.

    Keyword parameters:

    - ``protocol``: the aggregation protocol (nodes must be configured with the same);
    - ``privacy``: ``securefed.privacy.CentralDP`` or ``DistributedDP`` (nodes need the
      same): client-level DP with its accountant; every round's event goes to the
      ledger, kept in the checkpoint and the audit log; a round that could exceed
      ``target_epsilon`` is not started (PrivacyBudgetExceeded);
    - ``fraction_train``, ``min_train_nodes``, ``min_available_nodes``: sampling as in
      Flower's FedAvg; with privacy and ``fraction_train < 1``, Poisson sampling at
      q = round(fraction_train P) / P over the P nodes of the run's first round (a sample
      under ``min_train_nodes`` or the protocol's minimum skips its round); ``node_wait_timeout``:
      seconds to wait for enough nodes;
    - ``weighting``: ``"examples"`` (each node weights its update by its example count,
      capped at ``max_examples``, inside the aggregate) or ``"uniform"``; default
      ``"examples"``, and ``"uniform"`` (the only choice) with privacy;
    - ``server_lr``: step on the mean update (1.0 is FedAvg), shorthand for
      ``FedAvgM(server_learning_rate=server_lr)``; ``server_optimizer``: an object from
      :mod:`securefed.optim` (``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``), not both.
      It sees only the released aggregate; its state is in the checkpoint, and a resume with another
      optimizer or settings is refused (ConfigurationError);
    - ``phase_timeout``, ``train_timeout``, ``poll_interval``: see :class:`GridAggregator`;
    - ``cooldown_rounds``: a node that dropped out is not sampled for that many rounds
      (while enough others are available): a crashed node would otherwise cost a full
      phase timeout per round until Flower notices its missed heartbeats (about a minute);
    - ``checkpoint_dir``: checkpoint there after every round and resume from it; the checkpoint
      is signed with ``checkpoint_key`` (an Ed25519 key or PEM file), by default the audit key
      with an audit log, else ``DIR.key`` beside the folder (created for a new folder): keep
      it where only the server can read it. A checkpoint that was changed, or that disagrees
      with the audit log (cut, replaced, rolled back), is refused (ConfigurationError);
    - ``audit_log``, ``audit_key``: write the signed audit log (``securefed.audit``);
      ``audit_witness``: called with the log's head ``(seq, sha256)`` after every DP release
      entry and every round entry, before the server goes on: hand it to storage outside the
      server's trust boundary (a remote append-only log, a transparency service) and an auditor
      who pins the last witnessed head detects a log cut after a crash (spec section 8); an
      exception from it stops the run before the aggregate is used;
    - ``auxiliary``: party name to the node id that plays it (``{"decryptor": node}`` for
      CKKS/BFV with a decryptor); that node is never sampled as a client;
    - ``identities``: the federation's identity keys by node id (public keys suffice), for
      the active SecAgg variants: each round verifies against its own nodes' keys, so
      participants may change between rounds; nodes without a key are not sampled;
    - ``seed``: reproducible sampling, session ids and server coins, for tests and
      simulation only (nodes need the same seed for theirs);
    - ``evaluate_metrics``: federated evaluation after every round that released a model: metric name to
      a bound on its absolute value (``{"loss": 10.0, "accuracy": 1.0}``); ``fraction_evaluate`` (default 1.0)
      and ``min_evaluate_nodes`` (default 2) sample the nodes as Flower's FedAvg. Each node runs its
      evaluation function and the metrics are securely aggregated (example-weighted means, weights capped at
      ``max_examples``): the server sees only the sums. Not with privacy (ConfigurationError). Default None;
    - ``run_config``: the ServerApp's ``context.run_config``, for the active SecAgg variants: an input attested
      under another run configuration is dropped before the sum takes it (:class:`GridAggregator`);
    - ``max_payload_bytes``: larger replies are rejected before parsing (default ``64 * dim + 1 MiB``).

    Raises ConfigurationError for inconsistent parameters. See ``protocols/flower.md``.
    """

    def __init__(
        self,
        *,
        protocol: AggregationProtocol,
        privacy: Privacy | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        node_wait_timeout: float = 300.0,
        weighting: Literal["examples", "uniform"] | None = None,
        max_examples: int = 1000,
        server_lr: float = 1.0,
        server_optimizer: optim.ServerOptimizer | None = None,
        phase_timeout: float = 120.0,
        train_timeout: float = 600.0,
        poll_interval: float = 0.2,
        cooldown_rounds: int = 1,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        audit_log: str | os.PathLike[str] | None = None,
        audit_key: Any = None,
        checkpoint_key: Any = None,
        auxiliary: Mapping[str, int] | None = None,
        identities: KeyDirectory | None = None,
        seed: int | None = None,
        audit_witness: Callable[[int, str], None] | None = None,
        evaluate_metrics: Mapping[str, float] | None = None,
        fraction_evaluate: float = 1.0,
        min_evaluate_nodes: int = 2,
        run_config: Mapping[str, Any] | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        if audit_witness is not None and not callable(audit_witness):
            raise ConfigurationError("audit_witness must be a function (seq, sha256) -> None")
        mode = _check_options(privacy, fraction_train, min_train_nodes, min_available_nodes, weighting, max_examples,
                              cooldown_rounds)
        self.evaluate_metrics = _evaluation.check(evaluate_metrics, fraction_evaluate, min_evaluate_nodes, privacy,
                                                  max_examples)
        if self.evaluate_metrics is not None:
            evaluation_protocol(protocol)  # ConfigurationError now for a protocol whose range cannot hold them
        self.fraction_evaluate, self.min_evaluate_nodes = float(fraction_evaluate), min_evaluate_nodes
        self.protocol = protocol
        self.privacy = privacy
        self.aggregator = GridAggregator(protocol, phase_timeout=phase_timeout, train_timeout=train_timeout,
                                         poll_interval=poll_interval, privacy=privacy, auxiliary=auxiliary,
                                         identities=identities, run_config=run_config,
                                         max_payload_bytes=max_payload_bytes)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.node_wait_timeout = node_wait_timeout
        self.weighting = mode
        self.max_examples = max_examples
        self.server_lr = server_lr
        #: The configured server optimizer; each start() steps a copy (restored from the checkpoint).
        if isinstance(server_optimizer, Strategy):  # a Flower strategy steps the model on the secure mean
            server_optimizer = FlowerOptimizer(server_optimizer)
        self.server_optimizer = copy.deepcopy(optim.resolve(server_optimizer, server_lr))
        self._current: ArrayRecord | None = None  # the model configure_train recorded, for aggregate_train
        self.cooldown_rounds = cooldown_rounds
        self.checkpoint_dir = checkpoint_dir
        self.audit_log = audit_log
        self.audit_key = audit_key
        self.checkpoint_key = checkpoint_key
        self.audit_witness = audit_witness
        self.seed = seed
        if seed is not None:
            log.warning("securefed: seeded run: keys and coins are predictable; for tests and simulation only")

    # -- Flower's Strategy interface: one-message views of a secure round (start() runs the round) ------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """The messages the first exchange of round `server_round` would send to the nodes it samples now
        (with `arrays` and `config` where that exchange is the input phase, as for ``Plain``); records
        `arrays` for :meth:`aggregate_train`. A secure round has several exchanges: :meth:`start` runs them
        all. Empty when too few nodes are available; ConfigurationError with privacy (rounds need the
        run's privacy session: use start())."""
        self._current = arrays
        return _first_messages(self, server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The model after the server optimizer's step on a securely aggregated mean.

        `replies`: one message whose ArrayRecord is the model recorded by :meth:`configure_train`
        plus the round's mean update (what a secure round releases; the server never sees one node's
        update). Steps ``server_optimizer`` itself (start() steps a copy per run); returns the new
        model and the reply's MetricRecord. InvalidInput for anything else."""
        return _step_released(self, server_round, list(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """The first exchange of an evaluation round `server_round` of `arrays` with the nodes sampled now
        (``fraction_evaluate``, ``min_evaluate_nodes``); empty without ``evaluate_metrics`` or enough nodes.
        A secure evaluation round has several exchanges: :meth:`start` runs them all."""
        return _evaluation_messages(self, server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The metrics' example-weighted means from what a secure evaluation round releases: one reply whose
        MetricRecord holds the round's sum under ``"aggregate"`` (the nodes' inputs summed,
        ``_envelope.evaluation_dim``; the server never sees one node's) and, optionally, the number of
        nodes in it under ``"included"``. None without ``evaluate_metrics``; InvalidInput for anything else,
        and for a sum no honest inputs give (``_evaluation.means``)."""
        if self.evaluate_metrics is None:
            return None
        replies = list(replies)
        record = next(iter(replies[0].content.metric_records.values()), None) if len(replies) == 1 and \
            replies[0].has_content() else None
        total = record.get("aggregate") if record is not None else None
        if not isinstance(total, list):
            raise InvalidInput("aggregate_evaluate takes one reply whose MetricRecord holds the evaluation round's "
                               f"sum under 'aggregate', got {len(replies)} replies")
        n = record.get("included") if record is not None else None
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
        most = n or _evaluation.most_nodes(total, len(self.evaluate_metrics), self.max_examples)
        means = _evaluation.means(self.evaluate_metrics, np.asarray(total, np.float64), self.max_examples, n,
                                  evaluation_protocol(self.protocol).error_bound(most))
        return MetricRecord(cast(dict[str, int | float | list[int] | list[float]], means))

    def summary(self) -> None:
        """Log the configuration (what the audit log's session entry records)."""
        log.info("securefed: %s %s", type(self).__name__,
                 {k: v for k, v in _audit_config(self, 0).items() if k != "num_rounds"})

    # -- randomness and sampling --------------------------------------------------------------

    def _rng(self, label: str) -> RandomSource:
        return RandomSource() if self.seed is None else RandomSource(self.seed).child(f"flower/{label}")

    def _pool(self, grid: Grid, round_index: int, state: _RunState) -> list[int]:
        """The nodes the round may sample (sorted), once at least ``min_available_nodes`` are available."""
        deadline = time.monotonic() + self.node_wait_timeout
        while len(pool := _available(self, grid, round_index, state)) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS,
                                      f"only {len(pool)} nodes available after {self.node_wait_timeout:.0f} s; "
                                      f"need {self.min_available_nodes}")
            time.sleep(1.0)
        return pool

    def _sample(self, engine: RoundEngine, pool: list[int], round_index: int) -> list[int]:
        """The round's nodes from the pool: with privacy and fraction_train < 1 each node independently
        with probability q (the session's coins over the population, of which the pool is a prefix)."""
        picked = engine.sample(round_index, lambda: _fixed_sample(self, pool, round_index))  # indices into the pool
        return [pool[i] for i in picked if i < len(pool)]

    # -- the run ----------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> SecureResult:
        """Train until round `num_rounds` (counting rounds already in the checkpoint); returns the result.

        Flower's ``Strategy.start`` arguments. `train_config` goes to the nodes with the model (plus
        ``"server-round"``); ``timeout``: the most seconds any phase of this run waits for replies (each
        phase waits ``min(phase_timeout or train_timeout, timeout)``); ``evaluate_config`` goes to the nodes
        with the model in each federated evaluation round (``evaluate_metrics``; ConfigurationError without
        it), whose means land in the result's ``evaluate_metrics_clientapp``; ``evaluate_fn(round, arrays)``
        evaluates the global model centrally, on the initial model (round 0, in a new run) and after each round.
        Raises ConfigurationError for a checkpoint or audit log that does not fit this run,
        PrivacyBudgetExceeded before a round that could exceed the budget.
        """
        if evaluate_config is not None and self.evaluate_metrics is None:
            raise ConfigurationError("evaluate_config configures federated evaluation: declare the metrics and their "
                                     "bounds (SecureFedAvg(evaluate_metrics=...)), or evaluate centrally "
                                     "with evaluate_fn")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.summary()
        agg, saved = self.aggregator, (self.aggregator.phase_timeout, self.aggregator.train_timeout)
        agg.phase_timeout, agg.train_timeout = min(saved[0], float(timeout)), min(saved[1], float(timeout))
        try:
            return self._start(grid, initial_arrays, num_rounds, train_config, (evaluate_config, evaluate_fn))
        finally:
            agg.phase_timeout, agg.train_timeout = saved

    def _start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, train_config: ConfigRecord | None,
               evaluate: tuple[ConfigRecord | None, EvaluateFn | None]) -> SecureResult:
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ConfigurationError(f"num_rounds must be a positive int, got {num_rounds!r}")
        audit, key = _open_audit(self), None
        try:
            engine = RoundEngine(self.protocol, None, weighting=self.weighting,
                                 optimizer=copy.deepcopy(self.server_optimizer))
            run = _Run(initial_arrays, _RunState(), None, [], engine=engine, num_rounds=num_rounds)
            self.aggregator.prepared = None  # a round prepared by an earlier start() is not this run's
            if self.checkpoint_dir is not None:
                key = _checkpoint_signer(self, audit)
                restored = _resume.restore(self.checkpoint_dir, key, audit)
                run.key, run.counter, run.pending = key, restored.counter, restored.pending
                if restored.state is not None:
                    assert restored.arrays is not None
                    run.state, run.arrays, run.aggregate = (_RunState.from_json(restored.state), restored.arrays,
                                                            restored.aggregate)
                    _resume.restore_optimizer(restored, run.engine.optimizer)
                    log.info("securefed: resuming after round %d from %s", run.state.round, self.checkpoint_dir)
            elif audit is not None:
                run.pending = list(audit.ledger)  # releases already logged (a crash before any round entry)
            if self.privacy is not None:
                from securefed.privacy import Accountant

                try:  # checked now; the session (made at the first round, with the pool) resumes from it
                    Accountant.from_ledger(run.state.ledger + run.pending, self.privacy.accountant)
                except InvalidInput as e:
                    raise ConfigurationError(f"the checkpoint's privacy ledger cannot be accounted ({e}); restore "
                                             "the files the server wrote") from None
            if audit is None:
                return _run_rounds(self, grid, run, num_rounds, train_config, evaluate, None)
            settings = None if self.privacy is None else {"accountant": self.privacy.accountant,
                                                          "delta": self.privacy.delta}
            resumed = None if self.checkpoint_dir is None else restored.audit_checkpoint()
            with audit.session(config=_audit_config(self, num_rounds), privacy=settings,
                               seeded_secrets=self.seed is not None, checkpoint=resumed):
                run.audit = audit
                if self.checkpoint_dir is not None:
                    _resume.reconcile(audit, restored, protocol=self.protocol, privacy=self.privacy)
                elif audit.last_round:
                    raise ConfigurationError(f"the audit log {self.audit_log} already records rounds and this run "
                                             "has no checkpoint to continue from; use a new audit log")
                if self.audit_witness is not None:  # the resume entry, and the round entry a resume completed
                    self.audit_witness(*audit.head)
                return _run_rounds(self, grid, run, num_rounds, train_config, evaluate, audit)
        finally:
            if audit is not None:
                audit.close()



def _open_audit(s: SecureFedAvg) -> Any:
    """The strategy's audit writer (None without ``audit_log``)."""
    if s.audit_log is None:
        return None
    from securefed.audit import AuditWriter

    return AuditWriter(s.audit_log, key=s.audit_key)


def _checkpoint_signer(s: SecureFedAvg, audit: Any) -> Any:
    """The key that signs the checkpoints: ``checkpoint_key``, else the audit key, else ``DIR.key``."""
    assert s.checkpoint_dir is not None
    if s.checkpoint_key is None and audit is not None:
        from securefed.audit.keys import load_or_create_key

        return load_or_create_key(audit.path, s.audit_key)
    return _checkpoint.load_key(s.checkpoint_dir, s.checkpoint_key)


@dataclasses.dataclass
class _Run:
    """A run in progress: the model, the committed state, the accountant and events not yet committed."""

    arrays: ArrayRecord
    state: _RunState
    aggregate: np.ndarray | None
    pending: list[dict[str, Any]]
    engine: Any = None  # the round engine: server optimizer (with the run's state) and privacy session
    key: Any = None  # the checkpoint's signing key
    counter: int = 0  # the checkpoint counter: grows with every commit and resume
    audit: Any = None  # the open audit writer: every DP release is logged before the server uses it
    released: np.ndarray | None = None  # what the last round released (noised under central DP), never the raw sum
    num_rounds: int = 0  # the run's last round (it has no next round to prepare)
    drawn: tuple[int, list[int], list[int]] | None = None  # (round, pool, sample) drawn ahead for the next round


def _run_rounds(s: SecureFedAvg, grid: Grid, run: _Run, num_rounds: int, train_config: ConfigRecord | None,
                evaluate: tuple[ConfigRecord | None, EvaluateFn | None], audit: Any) -> SecureResult:
    state, (evaluate_config, evaluate_fn) = run.state, evaluate
    result = SecureResult(arrays=run.arrays)
    if state.round == 0 and evaluate_fn is not None and (initial := evaluate_fn(0, run.arrays)) is not None:
        result.evaluate_metrics_serverapp[0] = initial  # as Flower: the initial model too
    for report in state.history:
        _add_metrics(result, report)
    for r in range(state.round + 1, num_rounds + 1):
        report, outcome = _round(s, grid, r, run, train_config, evaluate_fn)
        if outcome is not None and s.evaluate_metrics is not None and s.fraction_evaluate > 0:
            report.metrics.update(_federated_evaluation(s, grid, r, run, evaluate_config))
        result.arrays = run.arrays
        _add_metrics(result, report)
        state.round = r
        state.history.append(report)
        for node in report.dropped:
            state.cooldown[node] = r + s.cooldown_rounds
        if (session := run.engine.session) is not None:
            state.ledger, state.privacy = session.accountant.ledger, _privacy.session_state(session)
        state.audit = _resume.audit_record(report, outcome) if audit is not None else None
        run.pending = []
        if s.checkpoint_dir is not None:
            run.counter += 1
            seq, head = audit.head if audit is not None else (0, "")
            _checkpoint.save(s.checkpoint_dir, key=run.key, round_index=r, counter=run.counter,
                             arrays=run.arrays, state=state.to_json(),
                             optimizer=(run.engine.optimizer.describe(), run.engine.optimizer.state_dict()),
                             audit_head=None if audit is None else {"seq": seq, "sha256": head},
                             aggregate=None if outcome is None or audit is None else run.released)
        if audit is not None:
            assert state.audit is not None
            _resume.write_round(audit, state.audit, None if outcome is None else run.released,
                                protocol=s.protocol, privacy=s.privacy, ledger=state.ledger,
                                epsilon=report.epsilon,
                                checkpoint_counter=run.counter if s.checkpoint_dir is not None else None)
            if s.audit_witness is not None:
                s.audit_witness(*audit.head)
    return result

def _round(s: SecureFedAvg, grid: Grid, r: int, run: _Run, train_config: ConfigRecord | None,
           evaluate_fn: EvaluateFn | None) -> tuple[RoundReport, RoundOutcome | None]:
    """One round through the round engine (:class:`~securefed.rounds.RoundEngine`) over the grid."""
    engine, pool = run.engine, s._pool(grid, r, run.state)
    start, spec = _model.flatten_record(run.arrays)
    if s.privacy is not None:
        _open_session(s, run, len(pool), start.size)
    nodes = _drawn(s, run, engine, pool, r)
    plan = None if len(nodes) < s.min_train_nodes else engine.plan(
        r, nodes, check=_check_round(engine), session_protocol=False)
    if plan is None:  # a Poisson sample too small to run: nothing sent, released or spent
        log.info("securefed: round %d: the sample of %d nodes is too small; skipped", r, len(nodes))
        return RoundReport(r, tuple(nodes), (), {}, {"skipped": 1.0}, engine.epsilon(),
                           AbortReason.TOO_FEW_SURVIVORS.value), None
    dim = engine.input_size(start.size)
    config = ConfigRecord({**(train_config or {}), "server-round": r,
                           **_privacy.round_config(engine.session)})
    s.aggregator.privacy = _privacy.at_round(s.privacy, engine.session)  # the round's clip, when it moves
    log.info("securefed: round %d with %d nodes", r, len(nodes))
    rng, weighted, after = s._rng(f"round/{r}"), s.weighting == "examples", _next_sample(s, grid, run, r)
    try:  # round r + 1's setup rides on this round's messages, with the randomness it would have on its own
        outcome = s.aggregator.run(grid, nodes, round_index=r, dim=dim, rng=rng, arrays=run.arrays,
                                      config=config, max_examples=s.max_examples if weighted else 0,
                                      next_nodes=after, next_rng=s._rng(f"round/{r + 1}"))
    except ProtocolAborted as e:
        log.error("securefed: round %d aborted (%s): %s", r, e.reason.value, e)
        rnd = s.aggregator.last_round
        dropped = rnd.dropped_nodes if rnd is not None and rnd.spec.round_index == r else {}
        return RoundReport(r, tuple(nodes), (), dropped, {}, engine.epsilon(), e.reason.value), None
    included = outcome.included_nodes
    # Under DP the release is accounted and logged (on_release) before the aggregate is used.
    out = engine.finish(r, start, outcome.result.total, len(included), len(nodes),
                        on_release=None if engine.session is None else lambda: _log_release(s, run, r))
    run.released = out.released  # noised under central DP: neither the checkpoint nor the log holds the raw sum
    run.arrays = _model.with_vector(run.arrays, out.new, spec)
    metrics: dict[str, float] = {
        "included": float(len(included)), "dropped": float(len(outcome.dropped_nodes)),
        "upload_bytes_per_node": float(np.mean([outcome.bytes_from[v] for v in included])),
        **{f"seconds_{phase}": s for phase, s in outcome.phase_seconds.items()},
        **{k: float(v) for k, v in out.metrics.items() if k != "epsilon"},  # the clip (public) and its count
    }
    if evaluate_fn is not None and (evals := evaluate_fn(r, run.arrays)) is not None:
        metrics.update({f"eval_{k}": float(v) for k, v in evals.items() if isinstance(v, (int, float))})
    report = RoundReport(r, outcome.nodes, included, outcome.dropped_nodes, metrics, out.epsilon)
    log.info("securefed: round %d done: %d included, %d dropped, epsilon %s %s", r, len(included),
             len(outcome.dropped_nodes), out.epsilon, {k: v for k, v in metrics.items() if k.startswith("eval_")})
    return report, outcome


def _check_options(privacy: Privacy | None, fraction_train: float, min_train_nodes: int, min_available_nodes: int,
                   weighting: str | None, max_examples: int, cooldown_rounds: int) -> str:
    """SecureFedAvg's sampling and weighting options, checked (ConfigurationError); returns the weighting."""
    _privacy.check(privacy)
    if not 0.0 < fraction_train <= 1.0:
        raise ConfigurationError(f"fraction_train must be in (0, 1], got {fraction_train!r}")
    if not 1 <= min_train_nodes <= min_available_nodes:
        raise ConfigurationError("need 1 <= min_train_nodes <= min_available_nodes, got "
                                 f"{min_train_nodes} and {min_available_nodes}")
    weighting = weighting or ("uniform" if privacy is not None else "examples")
    if weighting not in ("examples", "uniform"):
        raise ConfigurationError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    if privacy is not None and weighting != "uniform":
        raise ConfigurationError("with privacy every included node weighs the same: weighting='uniform'")
    if not isinstance(max_examples, int) or max_examples < 1:
        raise ConfigurationError(f"max_examples must be a positive int, got {max_examples!r}")
    if not isinstance(cooldown_rounds, int) or cooldown_rounds < 0:
        raise ConfigurationError(f"cooldown_rounds must be an int >= 0, got {cooldown_rounds!r}")
    return weighting


def _audit_config(s: SecureFedAvg, num_rounds: int) -> dict[str, Any]:
    """The strategy's configuration as the audit log's session entry records it."""
    return {
        "runtime": "flower", "strategy": type(s).__name__, "protocol": repr(s.protocol),
        "privacy": repr(s.privacy), "num_rounds": num_rounds, "fraction_train": s.fraction_train,
        "min_train_nodes": s.min_train_nodes, "weighting": s.weighting, "max_examples": s.max_examples,
        "server_lr": s.server_lr, "server_optimizer": s.server_optimizer.describe(),
        "phase_timeout": s.aggregator.phase_timeout, "train_timeout": s.aggregator.train_timeout,
        "cooldown_rounds": s.cooldown_rounds, "seed": s.seed, "auxiliary": s.aggregator.auxiliary,
        **({} if s.evaluate_metrics is None else {"evaluate_metrics": dict(s.evaluate_metrics),
                                                   "fraction_evaluate": s.fraction_evaluate,
                                                   "min_evaluate_nodes": s.min_evaluate_nodes}),
    }


def _add_metrics(result: SecureResult, report: RoundReport) -> None:
    """Add `report` and its evaluations (central ``eval_*``, federated ``federated_*``) to `result`."""
    result.rounds.append(report)
    for prefix, into in (("eval_", result.evaluate_metrics_serverapp),
                         ("federated_", result.evaluate_metrics_clientapp)):
        if got := {k.removeprefix(prefix): v for k, v in report.metrics.items()
                   if k.startswith(prefix) and k != "federated_aborted"}:
            into[report.round] = MetricRecord(cast(dict[str, int | float | list[int] | list[float]], got))


def _evaluation_sample(s: SecureFedAvg, grid: Grid, r: int, state: _RunState) -> list[int]:
    """The nodes of round r's evaluation: Flower FedAvg's sample size of those available now (the training
    pool's rules, without waiting), drawn with the round's own coins; empty when too few are available."""
    pool = _available(s, grid, r, state)
    k = _evaluation.sample_size(len(pool), s.fraction_evaluate, s.min_evaluate_nodes)
    return [pool[i] for i in _draw(s, len(pool), k, f"round/{r}/evaluate-sample")] if k else []


def _federated_evaluation(s: SecureFedAvg, grid: Grid, r: int, run: _Run,
                          config: ConfigRecord | None) -> dict[str, float]:
    """Round r's federated evaluation of the model it released: ``federated_<metric>`` means,
    ``federated_included``; ``federated_aborted`` (1.0) when the round released nothing."""
    assert s.evaluate_metrics is not None
    nodes = _evaluation_sample(s, grid, r, run.state)
    if not nodes:
        log.warning("securefed: round %d: too few nodes available to evaluate", r)
        return {"federated_aborted": 1.0}
    try:
        outcome = s.aggregator.evaluate(
            grid, nodes, round_index=r, metrics=s.evaluate_metrics, rng=s._rng(f"round/{r}/evaluate"),
            arrays=run.arrays, config=ConfigRecord({**(config or {}), "server-round": r}), max_examples=s.max_examples)
        n = len(outcome.included_nodes)
        means = _evaluation.means(s.evaluate_metrics, outcome.result.total, s.max_examples, n,
                                  evaluation_protocol(s.protocol).error_bound(n))
    except (ProtocolAborted, InvalidInput, ConfigurationError) as e:  # the training round stands (a sample the
        # protocol cannot run, too few replies, an impossible sum): its evaluation released nothing
        log.error("securefed: round %d: federated evaluation aborted: %s", r, e)
        return {"federated_aborted": 1.0}
    log.info("securefed: round %d: federated evaluation over %d nodes: %s", r, len(outcome.included_nodes), means)
    return {**{f"federated_{k}": v for k, v in means.items()}, "federated_included": float(len(outcome.included_nodes))}


def _open_session(s: SecureFedAvg, run: _Run, available: int, dimension: int) -> None:
    """The run's privacy session, made at its first round: the population is the pool of that round
    (the checkpoint's, on resume) and the Poisson rate round(fraction_train population) / population."""
    engine = run.engine
    assert s.privacy is not None  # _round opens a session only with privacy
    if engine.session is None:
        saved = run.state.privacy or {}
        population = int(saved.get("population", available))
        engine.session = _privacy.session(s.privacy, s.protocol, population=population,
                                          fraction=s.fraction_train, dimension=dimension,
                                          rng=s._rng("privacy"), ledger=run.state.ledger + run.pending,
                                          clip=saved.get("clip"))
    session = engine.session
    if session.sampling_rate < 1.0 and available > session.population:
        raise ConfigurationError(
            f"{available} nodes are available but the run's Poisson sampling covers {session.population} "
            "(the nodes of its first round): start a new run (new checkpoint) for the larger federation")


def _check_round(engine: RoundEngine) -> Callable[[list[int]], None] | None:
    """With privacy: ConfigurationError for a round the colluders could fill, before anything is sent."""
    session = engine.session
    if session is None:
        return None

    def check(nodes: list[int]) -> None:
        session.mechanism().honest_survivors(len(nodes))

    return check


def _log_release(s: SecureFedAvg, run: _Run, r: int) -> None:
    """Write the round's DP release ahead of its entry and commit, so a crash cannot hide it."""
    session = run.engine.session
    event = session.accountant.ledger[-1]
    if run.audit is not None:
        run.audit.release(r, dp_events=[event], epsilon=session.epsilon())
        if s.audit_witness is not None:
            s.audit_witness(*run.audit.head)
    elif s.checkpoint_dir is not None:
        _checkpoint.record_release(s.checkpoint_dir, event, key=run.key, round_index=run.state.round)
    run.pending.append(event)


def _available(s: SecureFedAvg, grid: Grid, round_index: int, state: _RunState) -> list[int]:
    """The nodes round `round_index` may sample now (sorted): available, not auxiliary, registered (with
    identities) and rested after a dropout while at least ``min_available_nodes`` others are."""
    available = sorted({int(v) for v in grid.get_node_ids()} - set(s.aggregator.auxiliary.values()))
    if (keys := s.aggregator.identities) is not None:
        available = [v for v in available if _identities.registered(keys, v)]
    rested = [v for v in available if state.cooldown.get(v, 0) < round_index]
    return rested if len(rested) >= s.min_available_nodes else available


def _drawn(s: SecureFedAvg, run: _Run, engine: RoundEngine, pool: list[int], r: int) -> list[int]:
    """Round r's sample: the one drawn ahead during round r - 1 when the pool is still the one it was drawn
    from (the same coins give the same sample; unseeded fixed-size samples are drawn once), else drawn now."""
    if run.drawn is not None and run.drawn[:2] == (r, pool):
        return list(run.drawn[2])
    return s._sample(engine, pool, r)


def _next_sample(s: SecureFedAvg, grid: Grid, run: _Run, r: int) -> list[int] | None:
    """Round r + 1's sample, drawn before round r sends anything from the pool as it is now, so that its
    setup can ride on round r's messages; None for the last round, a sample round r + 1 would not run, and
    adaptive clipping with DistributedDP (the nodes' encoder, in every phase's params, needs round r + 1's clip).

    Round r + 1 still plans (budget, skip) when it starts, and uses this sample only when its pool is
    the same (a node cooling down after a dropout in round r changes it); the aggregator takes the
    prepared round only for exactly its nodes (``GridAggregator.run``, ``protocols/flower.md`` section 6)."""
    run.drawn = None
    if r >= run.num_rounds or _privacy.moving_encoder(s.privacy):  # round r + 1's encoder needs round r's outcome
        return None
    pool = _available(s, grid, r + 1, run.state)
    if len(pool) < s.min_available_nodes:
        return None
    nodes = s._sample(run.engine, pool, r + 1)
    run.drawn = (r + 1, pool, nodes)
    if len(nodes) < s.min_train_nodes or (run.engine.session is not None and not run.engine.session.runnable(
            len(nodes))):
        return None
    try:
        if (check := _check_round(run.engine)) is not None:
            check(list(nodes))
    except ConfigurationError:  # raised again when round r + 1 starts, as without riding
        return None
    return nodes


def _fixed_sample(s: SecureFedAvg, pool: list[int], round_index: int) -> list[int]:
    """A sample of Flower's FedAvg's size (fraction_train of the pool, at least min_train_nodes), as indices
    into the pool: the fallback without privacy or with q = 1."""
    k = min(len(pool), max(s.min_train_nodes, int(len(pool) * s.fraction_train)))
    return _draw(s, len(pool), k, f"round/{round_index}/sample")


def _draw(s: SecureFedAvg, n: int, k: int, label: str) -> list[int]:
    """`k` of the indices ``0..n-1`` (sorted), drawn with the strategy's coins under `label`; all when k = n."""
    if k >= n:
        return list(range(n))
    coins = s._rng(label).integers_below(2**63, n)
    return sorted(np.argsort(coins, kind="stable")[:k].tolist())


def _first_messages(s: SecureFedAvg, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    grid: Grid) -> list[Message]:
    """What :meth:`SecureFedAvg.configure_train` returns: the first exchange of a fresh round (its own
    randomness, as start() would draw it) with the nodes sampled from those available now."""
    if s.privacy is not None:
        raise ConfigurationError("configure_train cannot build a round with privacy outside a run (the nodes need "
                                 "the run's privacy session): use start()")
    engine = RoundEngine(s.protocol, None, weighting=s.weighting, optimizer=optim.FedAvg())
    pool = _available(s, grid, server_round, _RunState())
    nodes = s._sample(engine, pool, server_round) if len(pool) >= s.min_available_nodes else []
    if len(nodes) < s.min_train_nodes:
        return []
    agg, flat = s.aggregator, _model.flatten_record(arrays)[0]
    rnd = AggregationRound(s.protocol, nodes, round_index=server_round, dim=engine.input_size(flat.size),
                           rng=s._rng(f"round/{server_round}"), max_payload_bytes=agg.max_payload_bytes,
                           max_examples=s.max_examples if s.weighting == "examples" else 0, privacy=agg.privacy,
                           auxiliary=agg.auxiliary, identities=agg.identities)
    phase = rnd.phases[0]
    ttl = agg.train_timeout if phase == input_phase(rnd.protocol) else agg.phase_timeout
    return rnd.messages(phase, ttl=ttl, arrays=arrays, config=ConfigRecord({**config, "server-round": server_round}))


def _evaluation_messages(s: SecureFedAvg, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[Message]:
    """What :meth:`SecureFedAvg.configure_evaluate` returns: the first exchange of a fresh evaluation round."""
    if s.evaluate_metrics is None:
        return []
    nodes = _evaluation_sample(s, grid, server_round, _RunState())
    if not nodes:
        return []
    agg = s.aggregator
    rnd = AggregationRound(s.protocol, nodes, round_index=server_round,
                           dim=_envelope.evaluation_dim(len(s.evaluate_metrics)),
                           rng=s._rng(f"round/{server_round}/evaluate"), max_payload_bytes=agg.max_payload_bytes,
                           max_examples=s.max_examples, auxiliary=agg.auxiliary, identities=agg.identities,
                           evaluate=s.evaluate_metrics)
    phase = rnd.phases[0]
    ttl = agg.train_timeout if phase == input_phase(rnd.protocol) else agg.phase_timeout
    return rnd.messages(phase, ttl=ttl, arrays=arrays, config=ConfigRecord({**config, "server-round": server_round}))


def _step_released(s: SecureFedAvg, server_round: int,
                   replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """What :meth:`SecureFedAvg.aggregate_train` returns: the server optimizer's step on the one reply's mean."""
    if s._current is None:
        raise InvalidInput("aggregate_train needs the model configure_train records: call configure_train first")
    content = replies[0].content if len(replies) == 1 and replies[0].has_content() else None
    if content is None or len(content.array_records) != 1:
        raise InvalidInput(f"aggregate_train takes one reply with one ArrayRecord (current model + the secure mean), "
                           f"got {len(replies)} replies")
    start, spec = _model.flatten_record(s._current)
    _model.same_layout(s._current, record := next(iter(content.array_records.values())))
    released = _model.flatten_record(record)[0]
    mean = released.astype(np.float64) - start.astype(np.float64)
    new, s.server_optimizer = optim.step_in_dtype(s.server_optimizer, start, mean, server_round)
    return _model.with_vector(s._current, new, spec), next(iter(content.metric_records.values()), None)


class FlowerOptimizer:
    """A Flower strategy with a server optimizer (``flwr.serverapp.strategy.FedAdam``, ``FedYogi``, ``FedAdagrad``,
    ``FedAvgM``...) as a securefed server optimizer: each step hands the released mean to the strategy's
    ``configure_train`` / ``aggregate_train`` as one reply of weight 1 whose arrays are ``weights + mean``, so
    Flower's own formula steps the model. ``SecureFedAvg(server_optimizer=FedAdam(...))`` wraps it in this.
    The checkpoint keeps the state of Flower's FedOpt family (``m_t``, ``v_t``) and FedAvgM's momentum."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __copy__(self) -> FlowerOptimizer:  # optim.step_in_dtype steps a copy: a failed step leaves this one as it was
        return FlowerOptimizer(copy.deepcopy(self.strategy))

    def step(self, weights: np.ndarray, mean_update: np.ndarray, round: int) -> np.ndarray:
        w, st = np.asarray(weights, np.float64).ravel(), self.strategy
        grid = _Nodes(max(int(getattr(st, "min_available_nodes", 1)), int(getattr(st, "min_train_nodes", 1)), 1))
        list(st.configure_train(round, ArrayRecord({"w": Array(w.copy())}), ConfigRecord(), cast(Grid, grid)))
        moved = ArrayRecord({"w": Array(w + np.asarray(mean_update, np.float64).ravel())})
        reply = Message(RecordDict({getattr(st, "arrayrecord_key", "arrays"): moved,
                                    "metrics": MetricRecord({getattr(st, "weighted_by_key", "num-examples"): 1})}),
                        dst_node_id=1, message_type=MessageType.TRAIN)
        new, _ = st.aggregate_train(round, [reply])
        if new is None:
            raise InvalidInput(f"{type(st).__name__}.aggregate_train returned no model for round {round}")
        return np.asarray(new["w"].numpy(), np.float64).ravel()

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {k: np.array(v["w"], np.float64) for k in ("m_t", "v_t") if (v := getattr(self.strategy, k, None))}
        if momentum := getattr(self.strategy, "momentum_vector", None):
            out["momentum_vector"] = np.array(momentum[0], np.float64)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in ("m_t", "v_t"):
            if k in state:
                setattr(self.strategy, k, {"w": np.array(state[k], np.float64)})
        if "momentum_vector" in state:
            setattr(self.strategy, "momentum_vector", [np.array(state["momentum_vector"], np.float64)])  # noqa: B010 - FedAvgM's, not Strategy's

    def describe(self) -> dict[str, Any]:
        keys = ("eta", "beta_1", "beta_2", "tau", "server_learning_rate", "server_momentum")
        return {"optimizer": f"flwr.{type(self.strategy).__name__}",
                **{k: float(getattr(self.strategy, k)) for k in keys if hasattr(self.strategy, k)}}


@dataclasses.dataclass
class _Nodes:
    """All that a Flower strategy's configure_train asks of a grid: `n` node ids."""

    n: int

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))
