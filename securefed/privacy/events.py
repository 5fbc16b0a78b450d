"""Privacy events: what one release (one training round) costs, as frozen, serializable records.

An event states the mathematics of one mechanism exactly (dp-accounting's
``DpEvent`` style): the accountant composes events, and the ledger of events,
as plain dicts, is what an auditor stores and recomputes epsilon from. Every
event counts ``steps`` identical releases, each on a Poisson sample (rate
``sampling_rate``) of the privacy units; ``num_clients`` is how many
participants were actually in the aggregate; ``round`` labels the training
round. See ``proofs/dp.md`` section 1 for the neighbouring relation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from securefed.errors import ConfigurationError, InvalidInput

__all__ = ["DDGEvent", "GaussianEvent", "PrivacyEvent", "SkellamEvent", "event_from_dict"]


def _positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")


def _count(name: str, v: object, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyEvent:
    """Common fields: ``steps`` releases, each on a Poisson sample at ``sampling_rate``."""

    mechanism: ClassVar[str] = ""

    noise_multiplier: float
    sampling_rate: float = 1.0
    steps: int = 1
    num_clients: int | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier)
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ConfigurationError(f"sampling_rate must be in [0, 1], got {q!r}")
        _count("steps", self.steps, 1)
        if self.num_clients is not None:
            _count("num_clients", self.num_clients, 1)
        if self.round is not None:
            _count("round", self.round, 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``{"mechanism": ..., <every field>}``."""
        return {"mechanism": self.mechanism, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyEvent:
        """Inverse of :meth:`to_dict`; raises InvalidInput for an unknown mechanism or field."""
        return event_from_dict(data)

    def _math_key(self) -> PrivacyEvent:
        """The same event without its label: equal keys have equal privacy cost."""
        return dataclasses.replace(self, round=None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianEvent(PrivacyEvent):
    """The (Poisson-subsampled) Gaussian mechanism, L2 sensitivity 1, noise std ``noise_multiplier``.

    Client level (DP-FedAvg): the sum of clipped updates plus N(0, (z C)^2) per
    coordinate, the unit a participant. Sample level (DP-SGD): a clipped
    per-example gradient sum, the unit one example. Accounted by dp-accounting.
    """

    mechanism: ClassVar[str] = "gaussian"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _IntegerEvent(PrivacyEvent):
    l2_clip: float
    dimension: int
    granularity: float
    beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("l2_clip", self.l2_clip)
        _positive("granularity", self.granularity)
        _count("dimension", self.dimension, 1)
        b = self.beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ConfigurationError(f"beta must be in [0, 1), got {b!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDGEvent(_IntegerEvent):
    """Distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021).

    Each of ``num_clients`` clients scales its update (L2 norm <= ``l2_clip``) by
    1/``granularity``, rounds it randomly (conditionally on ``beta``) and adds a
    discrete Gaussian share; the shares sum to total standard deviation
    ``noise_multiplier * l2_clip`` (real units). ``dimension``: length of the vector.
    """

    mechanism: ClassVar[str] = "ddg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_clients is None:  # tau depends on how many shares make up the noise
            raise ConfigurationError("a 'ddg' event needs num_clients, the number of noise shares in the sum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkellamEvent(_IntegerEvent):
    """Distributed Skellam (Agarwal, Kairouz and Liu, NeurIPS 2021).

    As :class:`DDGEvent`, with Skellam shares: their sum is Skellam with standard
    deviation ``noise_multiplier * l2_clip`` (real units), whatever the number of shares.
    """

    mechanism: ClassVar[str] = "skellam"


_EVENTS: dict[str, type[PrivacyEvent]] = {c.mechanism: c for c in (GaussianEvent, DDGEvent, SkellamEvent)}


def event_from_dict(data: Mapping[str, Any]) -> PrivacyEvent:
    """The event a ledger entry describes. Raises InvalidInput for a malformed entry."""
    if not isinstance(data, Mapping) or "mechanism" not in data:
        raise InvalidInput("a ledger entry must be a dict with a 'mechanism' key")
    cls = _EVENTS.get(data["mechanism"])
    if cls is None:
        raise InvalidInput(f"unknown mechanism {data['mechanism']!r}; known: {', '.join(sorted(_EVENTS))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - fields - {"mechanism"}
    if extra:
        raise InvalidInput(f"unknown fields for a {cls.mechanism!r} event: {sorted(extra)}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "mechanism"})
    except (TypeError, ConfigurationError) as e:
        raise InvalidInput(f"malformed {cls.mechanism!r} event: {e}") from None
