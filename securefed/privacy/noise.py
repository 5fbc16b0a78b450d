"""Noise modules: one small interface for where noise enters and what a round costs.

A noise module knows its mechanism and turns a round's facts (how many clients
were in it, how many could have been, the sampling rate) into the privacy event
the accountant records. :class:`CentralGaussian` is added by the server to the
decoded aggregate (the trusted-server setting: the server sees the exact sum
before it adds noise). The distributed mechanisms
(:class:`~securefed.privacy.distributed.DistributedDiscreteGaussian`,
:class:`~securefed.privacy.distributed.DistributedSkellam`) are integer encoders
that clients apply inside secure aggregation, and
:class:`~securefed.privacy.dpsgd.DPSGD` noises each local step. See
``protocols/dp.md``.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy import sampling
from securefed.privacy.events import GaussianEvent, PrivacyEvent

__all__ = ["CentralGaussian", "NoiseModule", "encoding_margin"]


def encoding_margin(protocol: Any, dimension: int) -> float:
    """How far, in L2, a protocol's encoding can move one client's update of `dimension` coordinates.

    ``sqrt(d) * protocol.error_bound(1)``: each coordinate of a single decoded input is within
    ``error_bound(1)`` of the input (for the fixed-point encoder, one step 1/s of stochastic
    rounding plus float64 slack; 0 for :class:`~securefed.protocols.Plain`). Central noise is
    provisioned for the clip plus this margin, so what a client adds to the decoded sum stays
    within the sensitivity the accountant is told (``proofs/dp.md`` section 2).
    """
    if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
        raise ConfigurationError(f"dimension must be a positive integer, got {dimension!r}")
    error = float(protocol.error_bound(1))
    if not (math.isfinite(error) and error >= 0):
        raise ConfigurationError(f"protocol {protocol!r} declares an error bound of {error!r}; it must be finite")
    return math.sqrt(int(dimension)) * error


class NoiseModule(abc.ABC):
    """The interface every noise mechanism shares."""

    mechanism: str = ""

    @abc.abstractmethod
    def event(self, *, included: int, n: int, sampling_rate: float = 1.0, round: int | None = None) -> PrivacyEvent:
        """The privacy event of a round of `n` participants of which `included` are in the aggregate."""

    @abc.abstractmethod
    def describe(self) -> dict[str, object]:
        """Parameters for logs and the audit trail."""


class CentralGaussian(NoiseModule):
    """N(0, (noise_multiplier * l2_clip)^2) added to every coordinate of the sum by the server.

    For a trusted server only: it sees the exact aggregate before noising it.
    """

    mechanism = "gaussian"

    def __init__(self, *, noise_multiplier: float, l2_clip: float) -> None:
        for name, v in (("noise_multiplier", noise_multiplier), ("l2_clip", l2_clip)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.l2_clip = float(l2_clip)

    def __repr__(self) -> str:
        return f"CentralGaussian(noise_multiplier={self.noise_multiplier!r}, l2_clip={self.l2_clip!r})"

    @property
    def stddev(self) -> float:
        """Noise standard deviation per coordinate."""
        return self.noise_multiplier * self.l2_clip

    def add_to(self, total: np.ndarray, rng: RandomSource) -> np.ndarray:
        """Add the noise to the float64 sum `total` in place (noise from the server's CSPRNG); returns it."""
        total += sampling.gaussian(rng, self.stddev, total.size)
        return total

    def event(self, *, included: int, n: int, sampling_rate: float = 1.0, round: int | None = None) -> PrivacyEvent:
        return GaussianEvent(noise_multiplier=self.noise_multiplier, sampling_rate=sampling_rate,
                             num_clients=included, round=round)

    def describe(self) -> dict[str, object]:
        return {"noise": "CentralGaussian", "noise_multiplier": self.noise_multiplier, "l2_clip": self.l2_clip}
