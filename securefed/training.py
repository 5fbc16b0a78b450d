"""Federated training over a torch model: FedAvg / FedSGD with any aggregation protocol.

Each round: sample participants, train locally (on ``device``, with FedProx's term when
``proximal_mu > 0``), flatten each update (new minus old trainable parameters) on the host,
aggregate through the protocol, and step the server optimizer (``securefed.optim``) on the mean update.
A participant trains when the protocol asks for its input (``LazyInputs``), so a round holds one
update at a time besides what the protocol keeps: memory O(model) at any number of participants.
Weights reach the server only inside the aggregate: a participant pre-scales its
update by its weight and appends the weight as one extra coordinate; the server
divides the summed update by the summed weight.

Randomness: ``seed`` makes the public randomness reproducible (local shuffling, and
the choice of participants without DP). The secret randomness (DP noise, participant
sampling under DP, DP-SGD's sampling and noise, every protocol key, mask and rounding
coin) comes from the OS unless ``reproducible_secrets=True`` asks for a simulation
whose secrets derive from the seed; such a run says so everywhere (a warning,
``history.seeded_secrets``, the audit log) and its epsilon is void.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from securefed import _trainer_checks as checks
from securefed import _trainer_steps as steps
from securefed import optim
from securefed.crypto.random import RandomSource, derive_key
from securefed.encoding import flatten, unflatten
from securefed.errors import (
    ConfigurationError,
    InvalidInput,
    PrivacyBudgetExceeded,
    ProtocolAborted,
    SeededSecretsWarning,
)
from securefed.protocols.base import AggregationProtocol, AggregationResult, LazyInputs, simulate_aggregation
from securefed.protocols.plain import Plain
from securefed.rounds import RoundEngine, RoundPlan, RoundRelease

if TYPE_CHECKING:
    from securefed.privacy.mechanisms import Privacy

__all__ = ["History", "RoundRecord", "SeededSecretsWarning", "Trainer", "progress_status"]

log = logging.getLogger("securefed.training")

#: ``dropouts(round, participants)`` -> ``{participant: phase}`` for that round.
DropoutSchedule = Callable[[int, Sequence[int]], Mapping[int, str]]


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One round of training.

    ``loss``: mean local training loss of the participants (example-weighted); None
    under DP (an exact function of the participants' data, so it is not released);
    ``metrics``: evaluation results on the public ``eval_dataset`` and round statistics;
    ``epsilon``: privacy spent so far (None without DP); ``included``: participants in
    the aggregate.
    """

    round: int
    loss: float | None
    metrics: dict[str, float]
    epsilon: float | None
    included: tuple[int, ...]


@dataclasses.dataclass
class History:
    """What :meth:`Trainer.fit` did, round by round.

    ``seeded_secrets``: True when the run's secret randomness (noise, sampling under DP,
    protocol keys and masks) derived from the public seed (``reproducible_secrets=True``):
    its epsilon and its secure aggregation are void.
    """

    rounds: list[RoundRecord] = dataclasses.field(default_factory=list)
    seeded_secrets: bool = False

    @property
    def final(self) -> RoundRecord:
        """The last round's record."""
        if not self.rounds:
            raise IndexError("no rounds were run")
        return self.rounds[-1]


def _select(model: nn.Module, parameters: Sequence[str] | Callable[[str, nn.Parameter], bool] | None) -> list[str]:
    """Names of the parameters to train and aggregate, in the model's order (see Trainer's ``parameters``)."""
    named = dict(model.named_parameters())
    if parameters is None:
        names = [name for name, p in named.items() if p.requires_grad]
        if not names:
            raise InvalidInput("the model has no trainable parameters")
        return names
    if callable(parameters):
        names = [name for name, p in named.items() if parameters(name, p)]
    elif isinstance(parameters, Sequence) and not isinstance(parameters, str):
        unknown = [name for name in parameters if name not in named]
        if unknown:
            raise ConfigurationError(f"the model has no parameters named {unknown}; see model.named_parameters()")
        wanted = set(parameters)
        names = [name for name in named if name in wanted]
    else:
        raise ConfigurationError("parameters must be None, a sequence of parameter names or a predicate (name, p)")
    if not names:
        raise ConfigurationError("parameters selects nothing: the round would aggregate an empty update")
    frozen = [name for name in names if not named[name].requires_grad]
    if frozen:
        raise ConfigurationError(f"parameters {frozen} have requires_grad=False: unfreeze them or leave them out")
    return names


def _check_arguments(
    model: Any, datasets: list[Dataset], algorithm: str, weighting: str | None, privacy: Privacy | None,
    clients_per_round: int | None,
) -> tuple[str, int]:
    """Validate the trainer's basic arguments; returns (weighting, clients per round)."""
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(algorithm, str) or algorithm not in ("fedavg", "fedsgd"):
        raise ConfigurationError(f"algorithm must be 'fedavg' or 'fedsgd', got {algorithm!r}")
    if not (weighting is None or (isinstance(weighting, str) and weighting in ("examples", "uniform"))):
        raise ConfigurationError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    if privacy is not None and weighting == "examples":
        raise ConfigurationError("with differential privacy every participant weighs the same: weighting='uniform'")
    n = len(datasets)
    k = n if clients_per_round is None else checks.integer("clients_per_round", clients_per_round, 1)
    if not 1 <= k <= n:
        raise ConfigurationError(f"clients_per_round must be in [1, {n}], got {clients_per_round}")
    return weighting or ("examples" if privacy is None else "uniform"), k


def _default_threads(model: nn.Module, torch_threads: int | None) -> int | None:
    """``torch_threads``, or 1 for models under 10^6 parameters (None: torch's own setting)."""
    if torch_threads is not None:
        torch_threads = checks.integer("torch_threads", torch_threads, 1)
    small = sum(p.numel() for p in model.parameters()) < 10**6
    return torch_threads if torch_threads is not None else (1 if small else None)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Freeze trainable parameters outside `names` for the block (no gradients, no steps)."""
    chosen = set(names)
    others = [p for name, p in model.named_parameters() if p.requires_grad and name not in chosen]
    for p in others:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


def _client_dropouts(schedule: DropoutSchedule | None, round: int, participants: list[int],
                     population: int) -> dict[int, str]:
    """The schedule's dropouts of this round as ``{client index in the round: phase}``.

    A participant of the population left out of this round's sample is ignored (a schedule
    may be written for the whole population); one outside the population is an error.
    """
    if schedule is None:
        return {}
    drops = checks.dropouts(schedule(round, list(participants)), round, population)
    index = {p: i for i, p in enumerate(participants)}
    return {index[p]: phase for p, phase in drops.items() if p in index}


def _describe(t: Trainer) -> dict[str, Any]:
    """The trainer's configuration as its audit log records it."""
    return {
        "trainer": type(t).__name__, "model": type(t.model).__name__,
        "trainable_parameters": int(sum(p.numel() for p in t._params().values())),
        "participants": len(t.datasets), "clients_per_round": t.clients_per_round,
        "algorithm": t.algorithm, "local_epochs": t.local_epochs, "batch_size": t.batch_size,
        "lr": t.lr, "momentum": t.momentum, "server_lr": t.server_lr, "weighting": t.weighting,
        "server_optimizer": t.server_optimizer.describe(), "proximal_mu": t.proximal_mu, "device": str(t.device),
        "protocol": repr(t.protocol), "privacy": repr(t.privacy), "seed": t.seed,
        "reproducible_secrets": t.reproducible_secrets,
    }


def progress_status(record: RoundRecord) -> str:
    """One round in a few words for a progress display: what may be shown (no loss under DP)."""
    acc, parts = record.metrics.get("eval_accuracy"), []
    if record.loss is not None:
        parts.append(f"loss {record.loss:.4f}")
    if acc is not None:
        parts.append(f"acc {acc:.3f}")
    if record.epsilon is not None:
        parts.append(f"eps {record.epsilon:.3f}")
    return "  ".join(parts)


def _fit_with_progress(trainer: Trainer, rounds: int) -> None:
    """Run `rounds` rounds of `trainer` under a rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=False,
    ) as bar:
        task = bar.add_task(f"training ({trainer.protocol.name})", total=rounds, status="")
        for _ in range(rounds):
            bar.update(task, advance=1, status=progress_status(trainer.run_round()))


class _RoundInputs:
    """The round's participants, each trained when the protocol asks for its input: one update held at a time.

    ``lazy()`` is the :class:`LazyInputs` the protocol reads. Participants train in their order in the
    round, as when every update was made before the protocol ran: one the protocol never asks (it
    dropped out before the input phase) still trains when its turn comes, for the round's loss and
    the same sequence of local runs, and its update is let go; :meth:`finish` trains those after the
    last one asked. An input asked again (out of order) is trained again from the same start.
    """

    def __init__(self, t: Trainer, participants: list[int], start: np.ndarray, spec: Any) -> None:
        self._t, self._participants, self._start, self._spec = t, participants, start, spec
        self._layout = [p.size for p in spec.params]
        self._next = 0  # participants before it have trained
        #: Each participant's mean local loss and example count, in the round's order.
        self.losses = [0.0] * len(participants)
        self.weights = [len(t.datasets[c]) for c in participants]

    def lazy(self) -> LazyInputs:
        return LazyInputs(len(self._participants), self._t._engine.input_size(self._start.size), self._input)

    def finish(self) -> None:
        """Train the participants after the last one the protocol asked (their losses count)."""
        while self._next < len(self._participants):
            self._update(self._next)

    def _input(self, i: int) -> np.ndarray:
        while self._next < i:  # not asked: dropped out before the input phase
            self._update(self._next)
        delta, t = self._update(i), self._t
        return t._engine.client_input(delta, self._layout, self.weights[i] / t._max_examples)

    def _update(self, i: int) -> np.ndarray:
        """Participant i's update (new minus start); its loss recorded. The model is left as it trained it:
        the round restores it."""
        t, c = self._t, self._participants[i]
        with _only_trainable(t.model, t._names), _threads(t.torch_threads):
            delta, self.losses[i] = t._local_update(c, self._start, self._spec)
        for p in t._params().values():  # a model-sized leftover; every local run starts with zero_grad anyway
            p.grad = None
        self._next = max(self._next, i + 1)
        if not np.isfinite(delta).all():
            raise InvalidInput(f"participant {c}'s local training diverged in round {t._round}: its update "
                               f"holds inf or NaN; lower lr (now {t.lr:g}) or check its data")
        return delta


def _finish_round(t: Trainer, res: AggregationResult, plan: RoundPlan, out: RoundRelease,
                  losses: list[float], weights: list[int]) -> RoundRecord:
    """Evaluate the new model, record the round (history, audit log, log line, ``on_round``); its record."""
    dp, participants = t.privacy_session, plan.participants
    included = tuple(participants[i] for i in res.included)
    metrics = t.evaluate()
    metrics["upload_bytes_per_client"] = float(np.mean([res.server_view.bytes_from(i) for i in res.included]))
    metrics["dropped"] = float(len(participants) - len(included))
    metrics.update(out.metrics)
    # Under DP the loss is an exact function of private data: not released (protocols/dp.md 2).
    mean_loss = float(np.average(losses, weights=weights)) if dp is None else None
    record = RoundRecord(t._round, mean_loss, metrics, out.epsilon, included)
    t.history.rounds.append(record)
    if t.audit is not None:
        t._audit_begin()
        t.audit.round(t._round, protocol=plan.protocol, result=res, participants=participants,
                      released=None if dp is None else out.released,
                      metrics=metrics if mean_loss is None else {"loss": mean_loss, **metrics},
                      dp_events=[] if dp is None else dp.unaudited_ledger(), epsilon=record.epsilon)
    shown = "" if mean_loss is None else f"loss {mean_loss:.4f} "  # under DP: not released
    log.info("round %d: %s%s included %s", t._round, shown, metrics, included)
    if t.on_round is not None:
        t.on_round(record)
    return record


def _skipped_round(t: Trainer, participants: list[int]) -> RoundRecord:
    """A Poisson sample too small for the protocol (or empty): no update, nothing released or spent; the audit
    log records it as ``round_skipped`` (as the Flower strategy does), so its round numbers have no gap."""
    assert t.privacy_session is not None
    metrics = {**t.evaluate(), "skipped": 1.0}
    record = RoundRecord(t._round, None, metrics, t.privacy_session.epsilon(), ())
    t.history.rounds.append(record)
    message = f"the sample of {len(participants)} participants was too small for {t.protocol.name}; skipped"
    if t.audit is not None:
        t._audit_begin()
        t.audit.round_skipped(t._round, participants=participants, message=message, epsilon=record.epsilon)
    log.info("round %d: %s", t._round, message)
    if t.on_round is not None:
        t.on_round(record)
    return record


def _minus(new: np.ndarray, start: np.ndarray) -> np.ndarray:
    """new - start, in place in `new` (flatten's fresh copy): one model-sized array, not two."""
    new -= start
    return new


def _seed_bytes(seed: int | None, label: str) -> bytes | None:
    return None if seed is None else derive_key(seed.to_bytes(8, "big"), label)


def _secret_source(seed: int | None, reproducible_secrets: bool) -> RandomSource:
    """The trainer's secret randomness: from the OS, or (simulation only) derived from `seed`."""
    if not isinstance(reproducible_secrets, bool):
        raise ConfigurationError(f"reproducible_secrets must be True or False, got {reproducible_secrets!r}")
    if not reproducible_secrets:
        return RandomSource()
    if seed is None:
        raise ConfigurationError("reproducible_secrets=True derives the secrets from the seed: pass seed=<int> too")
    message = (
        f"Trainer(seed={seed}, reproducible_secrets=True): the DP noise, the sampling of participants and every "
        "protocol key and mask derive from the public seed, so anyone who knows it can subtract the noise and "
        "unmask the updates; the run's epsilon and secure aggregation are void (tests and simulation only)"
    )
    warnings.warn(message, SeededSecretsWarning, stacklevel=3)
    log.warning("securefed: %s", message)
    return RandomSource(_seed_bytes(seed, "trainer/secrets"))


class Trainer:
    """Federated training of `model` over `datasets` (one per participant) through `protocol`.

    Parameters (keyword-only after ``datasets``; a wrong type, a bool for a number, NaN, inf or a value
    out of range is refused here: ConfigurationError, or InvalidInput for the model and data):

    - ``protocol``: an aggregation protocol (default :class:`~securefed.protocols.Plain`);
    - ``privacy``: a privacy configuration (``securefed.privacy.CentralDP``,
      ``DistributedDP`` or ``SampleLevelDP``), or None; see ``protocols/dp.md``. Client-level
      DP samples participants by Poisson sampling at rate clients_per_round / population;
      a target epsilon makes a round that could exceed it raise PrivacyBudgetExceeded
      before it starts; ``history.rounds[i].epsilon`` is the spend so far and
      ``trainer.accountant`` keeps the ledger;
    - ``algorithm``: ``"fedavg"`` (E local epochs of minibatch SGD) or ``"fedsgd"``
      (one full-batch gradient step per round);
    - ``parameters``: which parameters are trained locally and aggregated: None (every parameter
      with ``requires_grad``), a sequence of parameter names, or a predicate
      ``(name, parameter) -> bool``, e.g. only the adapters of a LoRA model on a frozen base
      (``lambda name, p: "lora_" in name``). Only their updates enter the aggregate, so a round
      carries (and secure aggregation costs) what is selected; the others keep their values on
      every participant (frozen during local training). ConfigurationError for an unknown name,
      a parameter with ``requires_grad=False``, or an empty selection;
    - ``clients_per_round``: participants sampled per round (default all);
    - ``local_epochs``, ``batch_size`` (integers >= 1), ``lr`` (>= 0: 0 is torch's bound, a probe
      whose update is the aggregate's noise), ``momentum`` (in [0, 1): 1 never forgets a step): local SGD;
    - ``server_lr``: step on the mean update (> 0; 1.0 is FedAvg), shorthand for
      ``FedAvgM(server_learning_rate=server_lr)``; ``server_optimizer``: what the server does with the
      round's mean update, an object from :mod:`securefed.optim` (``FedAvg``, ``FedAvgM``, ``FedAdam``,
      ``FedYogi``, ``FedAdagrad``, Flower's arithmetic; copied: ``trainer.server_optimizer`` holds the
      run's state); not both. It sees only the released aggregate (post-processing: every protocol and
      DP setting, same epsilon). A step that takes the model to inf or NaN raises InvalidInput and
      leaves the model and the optimizer's state as they were;
    - ``proximal_mu``: FedProx (>= 0, default 0: off): local training minimizes
      ``loss + (mu/2) ||w - w_global||^2`` over the trained parameters (``parameters=``);
    - ``device``: where local training, evaluation and DP-SGD's per-example work run: ``"cpu"``,
      ``"cuda"``, ``"cuda:N"``, ``"mps"``, a ``torch.device``, ``"auto"`` (CUDA if available, else the
      CPU) or None (default: where the model is); the model is moved there. Each update comes back
      to the host once for the protocol. ConfigurationError for a device that is not available;
    - ``weighting``: ``"examples"`` (weight n_k / max_k n_k, carried inside the
      aggregate) or ``"uniform"``; default ``"examples"``, and ``"uniform"`` (the only
      choice) with privacy: DP-FedAvg bounds each participant's influence, and
      example counts would reveal data sizes;
    - ``loss_fn``: default cross-entropy; ``eval_dataset``: the server's own held-out data for metrics,
      released as is (never a participant's data); under DP the training loss is not released;
    - ``dropouts``: a schedule ``(round, participants) -> {participant: phase}`` returning a dict;
      participants outside the round are ignored, outside the population refused;
    - ``seed``: makes the public randomness reproducible: local shuffling and, without DP, the
      choice of participants (an integer in [0, 2**64); default 0; None draws it from the OS too);
    - ``reproducible_secrets``: False (default): noise, sampling under DP, DP-SGD's coins and
      every protocol key and mask come from the OS, whatever the seed. True derives them from
      ``seed`` too (tests and simulation only, like Opacus without ``secure_mode``): a
      :class:`SeededSecretsWarning`, ``history.seeded_secrets`` and the audit log say so, and
      the epsilon is void;
    - ``progress``: show a rich progress bar; ``on_round``: called with each round's record;
    - ``audit_log``: write a signed audit log of every round there (an existing log is
      verified and continued, and round numbers go on after its last round; a missing folder
      is created);
      ``audit_key``: its Ed25519 key or PEM file (default ``PATH.key``); see ``protocols/audit.md``;
    - ``torch_threads``: torch's intra-op threads while participants train and the model is
      evaluated; default 1 for models under 10^6 parameters (the demo's rounds run ~5x faster
      on one thread on 2 cores), else torch's own setting.
    """

    def __init__(
        self,
        model: nn.Module,
        datasets: Sequence[Dataset],
        protocol: AggregationProtocol | None = None,
        privacy: Privacy | None = None,
        *,
        algorithm: Literal["fedavg", "fedsgd"] = "fedavg",
        parameters: Sequence[str] | Callable[[str, nn.Parameter], bool] | None = None,
        clients_per_round: int | None = None,
        local_epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        momentum: float = 0.0,
        server_lr: float = 1.0,
        server_optimizer: optim.ServerOptimizer | None = None,
        proximal_mu: float = 0.0,
        device: str | torch.device | None = None,
        weighting: Literal["examples", "uniform"] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        eval_dataset: Dataset | None = None,
        dropouts: DropoutSchedule | None = None,
        seed: int | None = 0,
        reproducible_secrets: bool = False,
        progress: bool = True,
        on_round: Callable[[RoundRecord], None] | None = None,
        audit_log: str | os.PathLike[str] | None = None,
        audit_key: Any = None,
        torch_threads: int | None = None,
    ) -> None:
        datasets = checks.datasets(datasets)
        mode, k = _check_arguments(model, datasets, algorithm, weighting, privacy, clients_per_round)
        checks.protocol(protocol, AggregationProtocol)
        checks.optional_callable("loss_fn", loss_fn, "(output, target) -> loss")
        checks.optional_callable("dropouts", dropouts, "(round, participants) -> {participant: phase}")
        checks.optional_callable("on_round", on_round, "(record) -> None")
        checks.audit(audit_log, audit_key)
        n = len(datasets)
        self.model = model
        self.datasets = datasets
        self.protocol = protocol if protocol is not None else Plain()
        self.privacy = privacy
        self.algorithm = algorithm
        self.clients_per_round = k
        self.local_epochs = checks.integer("local_epochs", local_epochs, 1)
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.lr = checks.real("lr", lr, low=0.0, low_open=False)
        self.momentum = checks.real("momentum", momentum, low=0.0, low_open=False, high=1.0)
        self.server_lr = checks.real("server_lr", server_lr, low=0.0)
        optimizer = copy.deepcopy(optim.resolve(server_optimizer, self.server_lr))
        self.proximal_mu = checks.real("proximal_mu", proximal_mu, low=0.0, low_open=False)
        self.device = steps.resolve_device(device, model)
        self.weighting = mode
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.eval_dataset = checks.eval_dataset(eval_dataset)
        self.dropouts = dropouts
        self.seed = checks.seed(seed)
        self.progress = checks.flag("progress", progress)
        self.on_round = on_round
        self._names = _select(model, parameters)
        self.torch_threads = _default_threads(model, torch_threads)
        self._max_examples = max(len(d) for d in self.datasets)
        #: Whether the secret randomness derives from ``seed`` (see ``reproducible_secrets``).
        self.reproducible_secrets = reproducible_secrets
        self._secrets = _secret_source(self.seed, reproducible_secrets)
        self._rng = RandomSource(_seed_bytes(self.seed, "trainer"))  # public: shuffling, sampling without DP
        self._round = 0
        #: The audit log's writer (``audit_log=``), or None.
        self.audit = None
        if audit_log is not None:
            from securefed.audit import AuditWriter

            self.audit = AuditWriter(audit_log, key=audit_key)
            self._round = self.audit.last_round or 0
        #: The differential privacy in force (``privacy=``), or None.
        self.privacy_session = None
        if privacy is not None:
            from securefed.privacy.session import PrivacySession

            self.privacy_session = PrivacySession(
                privacy, protocol=self.protocol, population=n, clients_per_round=k,
                dimension=sum(p.numel() for p in self._params().values()),
                local_steps=1 if algorithm == "fedsgd" else self.local_epochs, rng=self._secrets.child("privacy"),
            )
            if self.audit is not None and self.audit.ledger:
                self.privacy_session.resume(self.audit.ledger)
        self._engine = RoundEngine(self.protocol, self.privacy_session, weighting=mode, optimizer=optimizer)
        self.history = History(seeded_secrets=reproducible_secrets)
        model.to(self.device)

    @property
    def server_optimizer(self) -> optim.ServerOptimizer:
        """The server optimizer with the run's state (a copy of ``server_optimizer=``)."""
        return self._engine.optimizer

    @property
    def accountant(self) -> Any:
        """The privacy accountant (``.ledger``: one event per round), or None without privacy."""
        return None if self.privacy_session is None else self.privacy_session.accountant

    # -- one participant ------------------------------------------------------------

    def _params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {name: named[name] for name in self._names}

    def _local_update(self, client: int, start: np.ndarray, spec: Any) -> tuple[np.ndarray, float]:
        """Train from `start` on the client's data; return (new - start) and the mean loss."""
        self._load(start, spec)
        data = self.datasets[client]
        gen = torch.Generator()
        seed = self._rng.child(f"round/{self._round}/client/{client}").token_bytes(8)
        gen.manual_seed(int.from_bytes(seed, "big") >> 1)
        full = self.algorithm == "fedsgd"
        size = len(data) if full else self.batch_size
        loader = DataLoader(data, batch_size=size, shuffle=not full, generator=gen)
        opt = steps.local_optimizer(list(self._params().values()), lr=self.lr, momentum=self.momentum,
                                    mu=self.proximal_mu)
        self.model.train()
        dp = self.privacy_session
        if dp is not None and dp.local_training:
            loss = dp.train_locally(self.model, data, self.loss_fn, opt,
                                    self._secrets.child(f"round/{self._round}/client/{client}/dp-sgd"))
            return _minus(flatten(self._params())[0], start), loss
        loss = steps.sgd(self.model, self.loss_fn, opt, loader, 1 if full else self.local_epochs, gen.initial_seed(),
                         self.device)
        return _minus(flatten(self._params())[0], start), loss

    def _load(self, vector: np.ndarray, spec: Any) -> None:
        params = self._params()
        with torch.no_grad():
            for name, value in unflatten(vector, spec).items():  # type: ignore[union-attr]
                params[name].copy_(value)

    def _secret_seed(self, label: str) -> bytes | None:
        """The protocol's seed for this round: None (OS randomness) unless the secrets are reproducible."""
        if not self.reproducible_secrets:
            return None
        return _seed_bytes(self.seed, f"secrets/round/{self._round}/{label}")

    # -- rounds -------------------------------------------------------------------------

    def _sample(self, rng: RandomSource) -> list[int]:
        n = len(self.datasets)
        if self.clients_per_round == n:
            return list(range(n))
        keys = rng.child(f"sample/{self._round}").integers_below(2**63, n)
        return sorted(np.argsort(keys, kind="stable")[: self.clients_per_round].tolist())

    def _aggregate(
        self, inputs: Sequence[np.ndarray], drops: dict[int, str], protocol: AggregationProtocol
    ) -> AggregationResult:
        return simulate_aggregation(
            protocol, inputs, drops, seed=self._secret_seed("aggregation"), record="digest",
            round_index=self._round,
        )

    def run_round(self) -> RoundRecord:
        """Run one round and return its record (also appended to ``history``): the round engine
        (:class:`~securefed.rounds.RoundEngine`) with local training as the protocol's inputs."""
        self._round += 1
        engine, r, drops = self._engine, self._round, {}
        secret = engine.session is not None  # under DP the sample is secret randomness
        participants = engine.sample(r, lambda: self._sample(self._secrets if secret else self._rng))

        def schedule(chosen: list[int]) -> None:  # checked before anything is spent or trained
            drops.update(_client_dropouts(self.dropouts, r, chosen, len(self.datasets)))

        try:
            plan = engine.plan(r, participants, check=schedule)
        except (PrivacyBudgetExceeded, ConfigurationError):
            self._round -= 1
            raise
        if plan is None:
            return _skipped_round(self, participants)
        start, spec = flatten(self._params())
        start = start.copy()
        try:  # local training leaves the model elsewhere: restored however the round ends
            inputs = _RoundInputs(self, plan.participants, start, spec)  # trained as the protocol asks
            res = self._aggregate(inputs.lazy(), drops, plan.protocol)
            inputs.finish()
        except ProtocolAborted as e:
            self._audit_abort(plan, e)
            raise
        finally:
            self._load(start, spec)
        # Without an audit log nothing hashes the sum: the mean is made in place (one model-sized array).
        out = engine.finish(r, start, res.total, len(res.included), len(plan.participants),
                            in_place=self.audit is None)
        self._load(out.new, spec)  # the stepped optimizer is kept only when the step succeeded
        return _finish_round(self, res, plan, out, inputs.losses, inputs.weights)

    def _audit_abort(self, plan: RoundPlan, error: ProtocolAborted) -> None:
        if self.audit is not None:
            dp = self.privacy_session
            self._audit_begin()
            self.audit.round_aborted(plan.round, protocol=plan.protocol, participants=plan.participants, error=error,
                                     epsilon=None if dp is None else dp.epsilon(),
                                     dp_events=[] if dp is None else dp.unaudited_ledger())

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on ``eval_dataset`` (empty dict without one): public data, released as is."""
        if self.eval_dataset is None:
            return {}
        with _threads(self.torch_threads):
            return steps.evaluate(self.model, self.eval_dataset, self.loss_fn, self.device)

    def _audit_begin(self) -> None:
        """Open an audit session (run_start or resume) unless one is open."""
        if self.audit is not None and not self.audit.in_session:
            self.audit.start(**self._audit_header())

    def _audit_header(self) -> dict[str, Any]:
        """What a session of the audit log opens with: configuration, privacy settings, seeded secrets."""
        privacy = None if self.privacy_session is None else self.privacy_session.audit_settings()
        return {"config": _describe(self), "privacy": privacy, "seeded_secrets": self.reproducible_secrets}

    def fit(self, rounds: int = 10) -> History:
        """Train for `rounds` rounds; returns the history (every round so far).

        With an audit log, the rounds form one session: run_start (or resume) before,
        run_end after, with the status the training ended with.
        """
        rounds = checks.integer("rounds", rounds, 1)
        if self.audit is None or self.audit.in_session:
            return self._fit(rounds)
        with self.audit.session(**self._audit_header()):
            return self._fit(rounds)

    def _fit(self, rounds: int) -> History:
        if self.progress:
            _fit_with_progress(self, rounds)
        else:
            for _ in range(rounds):
                self.run_round()
        return self.history
