"""One federated round's server side, shared by :class:`~securefed.training.Trainer` and the Flower strategy.

:class:`RoundEngine` owns what every round does whatever runs the clients: sample the
participants (Poisson under client-level DP, through the
:class:`~securefed.privacy.session.PrivacySession`), skip a sample too small to run, check
the budget before anything is sent, pick the round's protocol, hand participants and
protocol to an injected ``aggregate`` (the trainer simulates the protocol over lazily
trained inputs; the Flower strategy runs it over the grid), make the released mean (noised
and accounted under DP, else the weighted or uniform mean), call the release hook, and step
the server optimizer (:mod:`securefed.optim`) on the mean. Local training, messaging,
evaluation, the audit log and checkpoints belong to the caller. See ``protocols/dp.md``
section 2 and ``protocols/flower.md`` sections 6-7.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from securefed import optim

__all__ = ["RoundEngine", "RoundPlan", "RoundRelease"]


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """A round that will run: its index, participants (the caller's ids) and protocol."""

    round: int
    participants: list[int]
    protocol: Any


@dataclasses.dataclass(frozen=True)
class RoundRelease:
    """What a round released: ``mean`` (the server optimizer's input), ``released`` (the sum an audit log
    or checkpoint may keep: noised under central DP, never the raw sum under DP), the model after the
    server step ``new``, ``epsilon`` (None without DP) and the DP ``metrics`` (clip, unclipped fraction;
    ``epsilon_unamplified`` when participants are Poisson-sampled, q < 1: the epsilon against whoever knows
    the sample, :meth:`~securefed.privacy.session.PrivacySession.epsilon_unamplified`)."""

    mean: np.ndarray
    released: np.ndarray
    new: np.ndarray
    epsilon: float | None
    metrics: dict[str, float]


class RoundEngine:
    """The server side of a round of `protocol`: sampling, budget, mean, release and server step.

    - ``session``: the :class:`~securefed.privacy.session.PrivacySession` in force, or None;
      only its public methods are used;
    - ``weighting``: ``"examples"`` (the aggregate's last coordinate is the summed weight,
      each input pre-scaled by its weight) or ``"uniform"``; with a session always uniform;
    - ``optimizer``: the server optimizer holding the run's state (:mod:`securefed.optim`):
      replaced by its stepped copy only when a step succeeds.
    """

    def __init__(self, protocol: Any, session: Any, *, weighting: str, optimizer: optim.ServerOptimizer) -> None:
        self.protocol = protocol
        self.session = session
        self.weighting = weighting
        self.optimizer = optimizer

    # -- before the round -------------------------------------------------------------

    def sample(self, round: int, fallback: Callable[[], list[int]]) -> list[int]:
        """The round's participants: Poisson under client-level DP with q < 1 (the session's CSPRNG coins
        over ``range(population)``), else ``fallback()`` (the caller's fixed-size choice)."""
        return fallback() if self.session is None else self.session.sample(round, fallback)

    def plan(self, round: int, participants: Sequence[int], *,
             check: Callable[[list[int]], None] | None = None, session_protocol: bool = True) -> RoundPlan | None:
        """The round to run, or None when the sample cannot make one (empty, or smaller than the protocol
        takes: nothing is released or spent, ``proofs/dp.md`` 1.2).

        ``check(participants)`` runs first (the caller's own refusals), then the budget check
        (PrivacyBudgetExceeded before anything is computed or sent). ``session_protocol``: the round's
        protocol comes from the session (distributed DP's encoder with the session's rotation); the
        Flower strategy passes False, as its round derives the rotation from the grid round's session id.
        """
        chosen, dp = list(participants), self.session
        if dp is not None and not dp.runnable(len(chosen)):
            return None
        if check is not None:
            check(chosen)
        if dp is not None:
            dp.before_round(round, len(chosen))
        protocol = self.protocol if dp is None or not session_protocol else dp.protocol(self.protocol, round)
        return RoundPlan(round, chosen, protocol)

    def input_size(self, dimension: int) -> int:
        """The length of one participant's input for an update of `dimension` values."""
        if self.session is not None:
            return int(self.session.input_size(dimension))
        return dimension + 1 if self.weighting == "examples" else dimension

    def client_input(self, update: np.ndarray, layout: Sequence[int], weight: float) -> np.ndarray:
        """A participant's input: clipped (plus the adaptive clip's count bit) under DP; else the update,
        pre-scaled by `weight` (in (0, 1]) with the weight appended when weighting by examples."""
        if self.session is not None:
            return np.asarray(self.session.client_input(update, layout))
        if self.weighting != "examples":
            return update
        x = np.empty(update.size + 1, dtype=np.float32)  # the weight rides along as the last coordinate
        np.multiply(update, weight, out=x[:-1])
        x[-1] = np.float32(weight)
        return x

    # -- after the aggregation ------------------------------------------------------------

    def release(self, round: int, total: np.ndarray, included: int, sampled: int, *, in_place: bool = False,
                on_release: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The round's (mean, released sum). Under DP the session noises, accounts and updates the adaptive
        clip; then ``on_release()`` runs (the Flower strategy logs the release there), before the mean is
        used. Without DP the mean is made in `total` itself when `in_place` (it is then no longer the sum)."""
        dp = self.session
        if dp is not None:
            mean = dp.finish_round(total, included, sampled, round)
            released = dp.released
        else:
            released = total
            work = total if in_place and total.flags.writeable else total.copy()
            if self.weighting == "examples":
                mean = work[:-1]
                mean /= work[-1]
            else:
                mean = work
                mean /= included
        if on_release is not None:
            on_release()
        return mean, released

    def step(self, start: np.ndarray, mean: np.ndarray, round: int) -> np.ndarray:
        """The model after the server optimizer's step on `mean` (InvalidInput for a non-finite result,
        the optimizer's state then unchanged)."""
        new, self.optimizer = optim.step_in_dtype(self.optimizer, start, mean, round)
        return new

    def finish(self, round: int, start: np.ndarray, total: np.ndarray, included: int, sampled: int, *,
               in_place: bool = False, on_release: Callable[[], None] | None = None) -> RoundRelease:
        """:meth:`release` then :meth:`step`: everything the server does with an aggregate."""
        mean, released = self.release(round, total, included, sampled, in_place=in_place, on_release=on_release)
        new = self.step(start, mean, round)
        dp = self.session
        return RoundRelease(mean, released, new, self.epsilon(), {} if dp is None else dict(dp.metrics))

    def epsilon(self) -> float | None:
        """Epsilon spent so far (None without DP)."""
        return None if self.session is None else self.session.epsilon()
