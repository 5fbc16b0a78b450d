"""An empirical privacy audit in one run (Steinke, Nasr and Jagielski, NeurIPS 2023), for DP mechanisms.

The auditor plants m canaries, includes each independently with probability 1/2 (coins from
its own :class:`~securefed.crypto.random.RandomSource`), runs the mechanism once, scores every
canary from the output, guesses "in" for the k+ highest scores and "out" for the k- lowest
(abstaining on the rest) and counts its correct guesses v out of r = k+ + k-. If the mechanism
is (epsilon, delta)-DP with respect to each canary, v is dominated by Binomial(r, e^eps /
(1 + e^eps)) up to a delta term (their Theorem 5.2; the p-value of their Appendix D), so every
epsilon whose p-value is below 1 - confidence is refuted: the largest is the audit's lower bound.
A lower bound above the accountant's epsilon means the mechanism leaks more than it is accounted
for (or the accountant is wrong), with probability at most 1 - confidence of a false alarm.

Scores, two per canary: the output at the canary's coordinate, and the same minus a *reference
run* of the mechanism on the neighbouring input without any canary, with a randomness source
independent of the first (:func:`audit_epsilon`'s ``noise_seed`` says otherwise). Honest noise
is independent between the runs, so the difference only adds noise; noise derived from a public
or fixed seed repeats, the difference is the canaries' signal exactly, and the audit refutes
any small epsilon. The guess sizes tried, both scores, one- and two-sided, share the error
probability (Bonferroni), so the bound stays valid whichever wins.

Mechanisms are callables ``mechanism(included, rng) -> output`` where ``included`` is a boolean
array of the m canaries and canary i is read at ``output[i]``; :func:`central_mechanism`,
:func:`distributed_mechanism` and :func:`dpsgd_mechanism` build them from the library's noise
modules at the aggregation level (cheap: one release). ``proofs/dp.md`` section 9.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import special  # type: ignore[import-untyped]

from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import IntegerEncoder
from securefed.encoding.packing import storage_dtype
from securefed.errors import ConfigurationError
from securefed.testing.conformance import ConformanceError

__all__ = [
    "AuditResult",
    "Mechanism",
    "accounted_epsilon",
    "assert_epsilon_respected",
    "audit_epsilon",
    "central_mechanism",
    "distributed_mechanism",
    "dpsgd_mechanism",
    "epsilon_lower_bound",
    "in_rounds",
    "p_value",
]

#: ``mechanism(included, rng) -> output``: one release with canary i present iff ``included[i]``.
Mechanism = Callable[[np.ndarray, RandomSource], np.ndarray]

_MAX_EPSILON = 60.0  # beyond this the binomial tail underflows; a bound this large refutes any accountant


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The outcome of one audit: ``epsilon_lower_bound`` and how it was reached."""

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    score: str  # "output" or "difference" (output minus the reference run)

    def __str__(self) -> str:
        return (f"epsilon >= {self.epsilon_lower_bound:.4g} at delta {self.delta:g} with confidence "
                f"{self.confidence:g} ({self.correct}/{self.guesses} correct guesses on {self.canaries} canaries, "
                f"{self.score} scores)")


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` of `guesses` right] under (epsilon, delta)-DP with `canaries` canaries.

    Steinke, Nasr and Jagielski (2023), Theorem 5.2 as computed in their Appendix D:
    P[Bin(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i, p = e^eps / (1 + e^eps).
    """
    m, r, v = canaries, guesses, correct
    if not 0 <= v <= r <= m:
        raise ConfigurationError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = 1.0 if v == 0 else float(special.bdtrc(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta > 0 and v > 0:
        j = np.arange(v - 1, -1, -1, dtype=np.float64)  # P[Bin = j] for j = v-1 down to 0
        log_pmf = (special.gammaln(r + 1.0) - special.gammaln(j + 1.0) - special.gammaln(r - j + 1.0)
                   - j * math.log1p(math.exp(-epsilon)) - (r - j) * (epsilon + math.log1p(math.exp(-epsilon))))
        below = np.cumsum(np.exp(log_pmf))  # P[v - i <= Bin < v], i = 1..v
        tail += 2.0 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(tail, 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` refute at `confidence` (0 if none)."""
    if not 0.0 < confidence < 1.0:
        raise ConfigurationError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence

    def refuted(eps: float) -> bool:
        return p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) < level

    if not refuted(0.0):
        return 0.0
    if refuted(_MAX_EPSILON):
        return _MAX_EPSILON
    lo, hi = 0.0, _MAX_EPSILON
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


def _guess_plans(m: int, guesses: Sequence[int] | None) -> list[tuple[int, int]]:
    """(k+, k-) pairs: for each guess count, two-sided (half each way) and one-sided ("in" only); and
    (m, -1), every canary guessed by the midpoint of the scores' range (exact on a noiseless output)."""
    counts = sorted({max(2, min(m, g)) for g in (guesses or (m // 20, m // 5, m // 2))})
    return [plan for g in counts for plan in ((g - g // 2, g // 2), (g, 0))] + [(m, -1)]


def _correct(scores: np.ndarray, truth: np.ndarray, k_in: int, k_out: int) -> int:
    """Correct guesses of a plan; every guess is a function of the scores alone (never of `truth`)."""
    if k_out < 0:
        mid = (float(scores.min()) + float(scores.max())) / 2.0
        return int(np.sum((scores > mid) == truth))
    order = np.argsort(-scores, kind="stable")  # ties broken by canary index: deterministic
    right = int(truth[order[:k_in]].sum())
    return right + (int((~truth[order[len(order) - k_out :]]).sum()) if k_out else 0)


def audit_epsilon(
    mechanism: Mechanism,
    *,
    canaries: int = 1000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    guesses: Sequence[int] | None = None,
    seed: int | bytes = 0,
    noise_seed: int | bytes | None = None,
    reference_seed: int | bytes | None = None,
) -> AuditResult:
    """Audit `mechanism` once with `canaries` canaries; returns the best lower bound on its epsilon at `delta`.

    `seed` drives the auditor's coins (which canaries are in). The audited run draws from
    ``RandomSource(noise_seed)`` (an OS-keyed source when None: a deployment); the reference run
    from ``RandomSource(reference_seed)`` (OS-keyed when None). Equal seeds model a deployment
    whose noise comes from a public seed the auditor knows, which the audit should catch;
    different seeds make an honest audit reproducible. `guesses`: the guess counts tried (default m/20,
    m/5, m/2), each two- and one-sided, plus all m canaries split at the midpoint of the scores,
    with both scores; the error probability
    1 - `confidence` is split evenly among them. Raises ConfigurationError for bad parameters.
    """
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ConfigurationError(f"canaries must be an integer >= 2, got {canaries!r}")
    if not (isinstance(delta, (int, float)) and 0.0 <= delta < 1.0):
        raise ConfigurationError(f"delta must be in [0, 1), got {delta!r}")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ConfigurationError(f"confidence must be a float in (0, 1), got {confidence!r}")
    coins = RandomSource(seed).child("privacy-audit/canaries").fill(np.empty(canaries, dtype=np.uint8))
    truth = (coins & 1).astype(bool)

    def source(key: int | bytes | None) -> RandomSource:
        return RandomSource() if key is None else RandomSource(key)

    out = np.asarray(mechanism(truth.copy(), source(noise_seed)), dtype=np.float64)[:canaries]
    ref = np.asarray(mechanism(np.zeros(canaries, dtype=bool), source(reference_seed)), dtype=np.float64)[:canaries]
    if out.shape != (canaries,) or ref.shape != (canaries,):
        raise ConfigurationError(f"the mechanism must return at least {canaries} values (canary i at index i)")
    plans = _guess_plans(canaries, guesses)
    tests = [(name, scores, plan) for name, scores in (("output", out), ("difference", out - ref)) for plan in plans]
    level_confidence = 1.0 - (1.0 - confidence) / len(tests)
    best: AuditResult | None = None
    for name, scores, (k_in, k_out) in tests:
        v = _correct(scores, truth, k_in, k_out)
        r = canaries if k_out < 0 else k_in + k_out
        eps = epsilon_lower_bound(canaries=canaries, guesses=r, correct=v, delta=delta, confidence=level_confidence)
        if best is None or eps > best.epsilon_lower_bound:
            best = AuditResult(eps, canaries, r, v, confidence, float(delta), name)
    assert best is not None
    return best


def accounted_epsilon(event: Any, delta: float) -> float:
    """What the library's RDP accountant charges for one `event` at `delta` (the audit's comparison)."""
    from securefed.privacy.accountant import Accountant

    acc = Accountant("rdp")
    acc.record(event)
    return acc.epsilon(delta)


def assert_epsilon_respected(result: AuditResult, epsilon: float, *, what: str = "the mechanism") -> None:
    """ConformanceError (property ``"audit"``) if the audit's lower bound exceeds the accounted `epsilon`."""
    if result.epsilon_lower_bound > epsilon:
        raise ConformanceError(
            "audit",
            f"{what} violates 'audit': the one-run audit shows {result}, above the accountant's epsilon "
            f"{epsilon:.4g}: the output reveals its canaries more than the privacy event allows (noise that "
            "repeats between runs, e.g. drawn from a fixed or public seed, or less noise than declared)",
        )


# -- the library's mechanisms at the aggregation level ------------------------------------------------


def in_rounds(mechanism: Mechanism, per_round: int) -> Mechanism:
    """m canaries spread over independent releases of `mechanism`, `per_round` canaries each.

    Release j draws from ``rng.child(f"release/{j}")``. Each canary is in one release only, so the
    releases together are as private towards it as one release (parallel composition): a few
    runs of a mechanism that holds few canaries audit like one run of many.
    """
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ConfigurationError(f"per_round must be a positive integer, got {per_round!r}")

    def run(included: np.ndarray, rng: RandomSource) -> np.ndarray:
        out = np.empty(included.size)
        for j, lo in enumerate(range(0, included.size, per_round)):
            part = included[lo : lo + per_round]
            out[lo : lo + part.size] = np.asarray(mechanism(part, rng.child(f"release/{j}")))[: part.size]
        return out

    return run


def central_mechanism(noise: Any, *, l2_clip: float | None = None) -> Mechanism:
    """Central noise (``add_to(total, rng)``, e.g. CentralGaussian): canary i adds ``l2_clip`` e_i to the sum.

    `l2_clip` defaults to the module's own ``l2_clip`` (the sensitivity its event assumes).
    """
    clip = float(noise.l2_clip if l2_clip is None else l2_clip)

    def run(included: np.ndarray, rng: RandomSource) -> np.ndarray:
        return np.asarray(noise.add_to(np.where(included, clip, 0.0), rng.child("central-noise")))

    return run


def distributed_mechanism(encoder: IntegerEncoder, *, clients: int | None = None) -> Mechanism:
    """A distributed-noise integer encoder (DDG, Skellam) in a round of ``clients`` (default: its dimension).

    Client i < m holds canary i, ``l2_clip`` e_i, when included and the zero vector otherwise (the
    zero-out neighbour: every client still adds its noise share); the rest hold zeros. Each client
    encodes with its own child of the run's source; the modular sum is decoded.
    """
    d = int(encoder.dimension)  # type: ignore[attr-defined]
    clip = float(encoder.l2_clip)  # type: ignore[attr-defined]
    n = d if clients is None else int(clients)

    def run(included: np.ndarray, rng: RandomSource) -> np.ndarray:
        if included.size > min(n, d):
            raise ConfigurationError(f"{included.size} canaries need that many clients and coordinates "
                                     f"(have {n} clients, dimension {d})")
        k = encoder.modulus_bits(n)
        acc = np.zeros(d, dtype=np.uint64)
        for i in range(n):
            x = np.zeros(d)
            if i < included.size and included[i]:
                x[i] = clip
            acc += encoder.encode(x, n=n, rng=rng.child(f"client/{i}")).astype(np.uint64)
        acc &= np.uint64((1 << k) - 1) if k < 64 else np.uint64(2**64 - 1)
        return encoder.decode(acc.astype(storage_dtype(k)), n=n, count=n)

    return run


def dpsgd_mechanism(dpsgd: Any) -> Mechanism:
    """One step of ``DPSGD.train`` (its Poisson sampling, clipping and noise) on a linear model.

    The dataset holds m examples; example i's gradient is ``max_grad_norm`` e_i when canary i is in
    and 0 otherwise (so the sampling coins and the expected batch do not depend on the canaries).
    The output is the step's weight change times the expected batch: the sampled canaries' clipped
    gradients minus the noise.
    """
    import torch
    from torch.utils.data import TensorDataset

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(out.squeeze(-1) * target).mean()  # per-example gradient: -x

    def run(included: np.ndarray, rng: RandomSource) -> np.ndarray:
        m = included.size
        model = torch.nn.Linear(m, 1, bias=False, dtype=torch.float64)
        torch.nn.init.zeros_(model.weight)
        x = torch.diag(torch.from_numpy(np.where(included, float(dpsgd.max_grad_norm), 0.0)))
        data = TensorDataset(x, torch.ones(m, dtype=torch.float64))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        dpsgd.train(model, data, loss_fn=loss_fn, optimizer=opt, steps=1, rng=rng)
        return model.weight.detach().numpy().ravel() * (dpsgd.sampling_rate * m)

    return run
