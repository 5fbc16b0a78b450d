"""Federated evaluation with securely aggregated metrics: the strategy's side (``protocols/flower.md`` section 6).

An evaluation round is its own aggregation round (``GridAggregator.evaluate``): each sampled node
evaluates the model on its own data and inputs, for the declared metrics ``m_i`` with bounds ``b_i`` and
its weight ``w = min(examples, max_examples) / max_examples``, ``w m_i / b_i`` (``m_i`` clamped to its
bound), ``w``, and counts of what it clamped or could not use (``_envelope.evaluation_dim``); the server
learns only the sum, hence the example-weighted means (Flower's FedAvg weighting, capped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from securefed.errors import ConfigurationError, InvalidInput
from securefed.flower import _envelope

__all__ = ["check", "means", "sample_size"]


#: The largest ``max_examples`` with federated evaluation: one example's weight still has over 2000 steps at
#: the evaluation round's 32 bits (at 10^8 a node of one example moved a mean by 4%).
MAX_EXAMPLES = 2**20


def check(metrics: Mapping[str, float] | None, fraction: float, minimum: int,
          privacy: Any, max_examples: int = 1000) -> tuple[tuple[str, float], ...] | None:
    """``SecureFedAvg``'s evaluation options, checked (ConfigurationError); returns the metrics in order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"fraction_evaluate must be in [0, 1], got {fraction!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        raise ConfigurationError(f"min_evaluate_nodes must be a positive int, got {minimum!r}")
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping) or not metrics:
        raise ConfigurationError("evaluate_metrics must map each metric name to the bound of its absolute value, "
                                 "for example {'loss': 10.0, 'accuracy': 1.0}")
    if len(metrics) > _envelope.MAX_METRICS:
        raise ConfigurationError(f"evaluate_metrics: at most {_envelope.MAX_METRICS} metrics, got {len(metrics)}")
    out = []
    for name, bound in metrics.items():
        if not isinstance(name, str) or not name or name in _envelope.RESERVED_METRICS or ":" in name:
            raise ConfigurationError(f"evaluate_metrics: {name!r} is not a metric name of its own (reserved: "
                                     f"{sorted(_envelope.RESERVED_METRICS)}, and ':' is for 'clipped:<metric>'; "
                                     "'num-examples' is always aggregated)")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= _envelope.MAX_BOUND:
            raise ConfigurationError(f"evaluate_metrics[{name!r}] must be a bound in (0, {_envelope.MAX_BOUND:g}] "
                                     f"on |{name}|, got {bound!r}")
        out.append((name, float(bound)))
    if isinstance(max_examples, int) and max_examples > MAX_EXAMPLES:
        raise ConfigurationError(f"federated evaluation weighs nodes by examples capped at max_examples, at most "
                                 f"{MAX_EXAMPLES} (got {max_examples}): smaller weights lose precision at 32 bits")
    if privacy is not None:
        raise ConfigurationError(
            "federated evaluation releases exact sums of the nodes' metrics, which the privacy budget does not "
            "cover (and DP nodes refuse it): leave evaluate_metrics unset and evaluate centrally with evaluate_fn")
    return tuple(out)


def sample_size(available: int, fraction: float, minimum: int) -> int:
    """How many of `available` nodes evaluate: Flower FedAvg's ``max(min_evaluate_nodes, floor(fraction
    available))``, at most `available`; 0 when fewer than `minimum` are available or `fraction` is 0."""
    if fraction == 0 or available < minimum:
        return 0
    return min(available, max(minimum, int(available * fraction)))


def means(metrics: tuple[tuple[str, float], ...], total: np.ndarray, max_examples: int,
          included: int | None = None, error: float = 0.0) -> dict[str, float]:
    """What an evaluation round's released sum `total` (``_envelope.evaluation_dim``) over `included` nodes
    gives: each metric's example-weighted mean (of the values clamped to their bounds), ``num-examples`` (the
    summed example counts, each capped at `max_examples`), ``clipped:<metric>`` (how many nodes' values were
    clamped) and ``excluded`` (how many nodes' metrics were not finite: not in the means). `error`: the
    protocol's error bound per coordinate of the sum (None for `included`: no bound on the node count).

    InvalidInput for a sum no honest inputs give (a corrupt node can add anything within the encoder's
    range): counts outside ``[0, included]``, a summed weight below ``(included - excluded) / max_examples``
    or above ``included``, a mean outside its bound (all beyond `error`), or no node's metrics at all."""
    k = len(metrics)
    total = np.asarray(total, np.float64).ravel()
    if total.size != _envelope.evaluation_dim(k) or not np.all(np.isfinite(total)):
        raise InvalidInput(f"an evaluation round over {k} metrics releases {_envelope.evaluation_dim(k)} finite "
                           f"sums, got {total.size}")
    slack, top = error + 1e-9, float(included) if included is not None else np.inf
    weight, clipped, excluded = float(total[k]), total[k + 1: 2 * k + 1], float(total[-1])
    counts = np.append(clipped, excluded)
    if np.any(counts < -slack) or np.any(counts > top + slack):
        raise InvalidInput(f"the evaluation round's counts {np.round(counts, 3).tolist()} are outside [0, {included}]: "
                           "no honest inputs sum to them (a corrupt node's input)")
    least = (top - round(excluded)) / max_examples if included is not None else 0.0
    if not (weight > slack and least - slack <= weight <= top + slack):
        raise InvalidInput(f"the evaluation round's summed weight {weight:g} is outside [{least:g}, {included}] or "
                           "not positive: no honest inputs sum to it (a corrupt node's, or no node's metrics)")
    out = {name: float(total[i]) * bound / weight for i, (name, bound) in enumerate(metrics)}
    if bad := [name for name, bound in metrics if abs(out[name]) > bound * (1 + 2 * slack / (weight - slack))]:
        raise InvalidInput(f"the evaluation round's means of {bad} are outside their bounds: no honest inputs give "
                           "them (a node sent values outside its weight times the bound)")
    out["num-examples"] = float(round(weight * max_examples))
    out.update({f"clipped:{name}": float(round(c)) for (name, _), c in zip(metrics, clipped)})
    out["excluded"] = float(round(excluded))
    return out



def most_nodes(total: Any, k: int, max_examples: int) -> int:
    """The most nodes an evaluation round's sum over `k` metrics can hold: each has at least one example
    (the summed weight times `max_examples`), plus the excluded ones; at least 1."""
    values = np.nan_to_num(np.asarray(total, np.float64).ravel())
    if values.size != _envelope.evaluation_dim(k):
        return 1
    return int(min(2**32, max(1.0, np.ceil(abs(values[k]) * max_examples + abs(values[-1])))))
