"""The privacy accountant: composes events, converts to (epsilon, delta), keeps the ledger.

Gaussian events go to Google's dp-accounting (``RdpAccountant``/``PLDAccountant``,
add-or-remove-one neighbours). At fractional RDP orders of a subsampled Gaussian, where
dp-accounting's series is loose or gives up (infinity), the RDP comes from
:func:`securefed.privacy._bounds.sampled_gaussian_log_a` (the signed series Opacus sums,
truncated so that it stays an upper bound); integer orders and PLD are dp-accounting's.
The distributed discrete Gaussian and Skellam events, which dp-accounting lacks,
get their RDP curves from :mod:`securefed.privacy._bounds` at the same orders and
compose with the rest by adding RDP. See ``proofs/dp.md`` section 5.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import _bounds
from securefed.privacy.events import DDGEvent, GaussianEvent, PrivacyEvent, SkellamEvent, event_from_dict

__all__ = ["Accountant", "compute_epsilon", "rdp_orders"]

AccountantKind = Literal["rdp", "pld"]
Conversion = Literal["improved", "classic"]


def _dpa() -> Any:
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigurationError("privacy accounting needs dp-accounting: pip install 'securefed[dp]'") from e
    return dp_accounting


@functools.cache
def rdp_orders() -> np.ndarray:
    """The RDP orders: dp-accounting's defaults (1.1 .. 10.9 by 0.1, 11 .. 63, 128, 256, 512, 1024)."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    orders = np.array(DEFAULT_RDP_ORDERS, dtype=np.float64)
    orders.setflags(write=False)
    return orders


def _dp_event(event: GaussianEvent) -> Any:
    dpa = _dpa()
    inner = dpa.GaussianDpEvent(event.noise_multiplier)
    if event.sampling_rate < 1.0:
        inner = dpa.PoissonSampledDpEvent(event.sampling_rate, inner)
    return dpa.SelfComposedDpEvent(inner, event.steps)


def _integer_curve(event: PrivacyEvent, orders: np.ndarray) -> np.ndarray:
    """The mechanism's RDP at `orders` for one release without sampling (integer domain, ``_bounds``)."""
    assert isinstance(event, (DDGEvent, SkellamEvent))
    d = event.dimension
    scaled_clip = event.l2_clip / event.granularity
    sigma = event.noise_multiplier * scaled_clip  # integer-domain std of the total noise
    if not (scaled_clip > 0.0 and math.isfinite(sigma**2 * d) and sigma**2 > 0.0):
        # inf or 0 here would make NaN RDP, which the conversion would read as epsilon 0
        raise ConfigurationError(
            f"the {event.mechanism!r} integer domain over- or underflows float64: l2_clip / granularity = "
            f"{scaled_clip!r}, noise_multiplier = {event.noise_multiplier!r}, dimension = {d!r}; choose "
            "granularity near l2_clip / (100 sqrt(dimension)) (privacy.default_granularity)")
    l2 = _bounds.rounded_l2_bound(scaled_clip, d, event.beta)
    l1 = _bounds.rounded_l1_bound(l2, d)
    if isinstance(event, DDGEvent):
        assert event.num_clients is not None
        tau = _bounds.ddg_tau(sigma / math.sqrt(event.num_clients), event.num_clients)
        return _bounds.ddg_rdp(orders, l2, l1, sigma, tau, d)
    return _bounds.skellam_rdp(orders, l2, l1, sigma**2)


@functools.lru_cache(maxsize=256)
def _event_rdp(key: PrivacyEvent) -> np.ndarray:
    """RDP of `key` (all its steps) at :func:`rdp_orders`. Cached: the trainer repeats events."""
    orders = rdp_orders()
    if isinstance(key, GaussianEvent):
        acc = _dpa().rdp.RdpAccountant(orders=list(orders))
        # dp-accounting warns (through absl) for each small fractional order whose series does not
        # converge and leaves it out (infinite RDP); that is expected for small noise, not news.
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            acc.compose(_dp_event(key))
        finally:
            absl.setLevel(level)
        out = np.asarray(acc.rdp, dtype=np.float64).copy()
        if 0.0 < key.sampling_rate < 1.0:
            # dp-accounting sums the fractional orders' series without their signs, and gives up
            # (infinity) where it converges slowly (small orders at z near 1): these orders take the
            # signed series' upper bound instead (Mironov et al. 2019, as Opacus; proofs/dp.md 5.2).
            for k in np.flatnonzero(orders != np.round(orders)):
                log_a = _bounds.sampled_gaussian_log_a(key.sampling_rate, key.noise_multiplier, float(orders[k]))
                out[k] = min(out[k], key.steps * log_a / (float(orders[k]) - 1.0))
    else:
        # DDG's bound (Proposition 14) holds at every real order; Skellam's theorem and Zhu-Wang's
        # amplification are for integer orders, where a fractional order takes the value at its
        # ceiling (an upper bound: RDP is non-decreasing in the order).
        ceil = np.maximum(np.ceil(orders - 1e-9).astype(np.int64), 2)
        uniq, inverse = np.unique(ceil, return_inverse=True)
        base = _integer_curve(key, np.arange(int(uniq.max()) + 1, dtype=np.float64))
        cap = _integer_curve(key, orders) if isinstance(key, DDGEvent) else base[ceil]
        if key.sampling_rate < 1.0:
            cap = np.minimum(cap, _bounds.poisson_subsampled_rdp(uniq, key.sampling_rate, base)[inverse])
        out = key.steps * cap
    out.setflags(write=False)
    return out


def _rdp_to_epsilon(rdp: np.ndarray, delta: float, conversion: Conversion) -> float:
    orders = rdp_orders()
    if not np.any(rdp > 0):
        return 0.0
    if conversion == "classic":
        # Mironov 2017, Proposition 3: eps = min_a RDP(a) + log(1/delta) / (a - 1).
        return float(max(0.0, np.min(rdp + math.log(1.0 / delta) / (orders - 1.0))))
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as dpa_epsilon

    return float(dpa_epsilon(orders, rdp, delta)[0])


@contextlib.contextmanager
def _numerics(event: PrivacyEvent, kind: str) -> Iterator[None]:
    """ConfigurationError for an event whose numbers overflow the accounting (dp-accounting's OverflowError,
    ZeroDivisionError or ValueError at an extreme noise_multiplier, sampling_rate or steps)."""
    try:
        yield
    except (ArithmeticError, ValueError) as e:
        if isinstance(e, ConfigurationError | InvalidInput):
            raise
        hint = " or accountant='rdp'" if kind == "pld" else ""
        raise ConfigurationError(
            f"the {kind!r} accountant cannot evaluate {event!r} ({type(e).__name__}: {e}): a noise_multiplier, "
            f"sampling_rate or steps too extreme for float64; use values of moderate size{hint}") from None


def _unamplified_into(acc: Accountant, events: list[PrivacyEvent]) -> Accountant:
    """`acc` (which holds a prefix of `events` at rate 1) after recording the rest at sampling_rate 1.0."""
    for event in events[len(acc):]:
        acc.record(event if event.sampling_rate == 1.0 else dataclasses.replace(event, sampling_rate=1.0))
    return acc


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


class Accountant:
    """Composes privacy events and answers epsilon for a delta; keeps the ledger.

    ``accountant``: ``"rdp"`` (every mechanism; events compose by adding RDP) or
    ``"pld"`` (Gaussian events only, through dp-accounting's privacy loss
    distributions). ``conversion`` (RDP only): ``"improved"`` is dp-accounting's
    (Balle et al. 2020, Proposition 12); ``"classic"`` is Mironov's
    min_a RDP(a) + log(1/delta)/(a-1), which reproduces Abadi et al. 2016.
    See ``proofs/dp.md`` section 5.
    """

    def __init__(self, accountant: AccountantKind = "rdp", *, conversion: Conversion = "improved") -> None:
        # isinstance first: `in` on a numpy array compares elementwise and raises ValueError
        if not isinstance(accountant, str) or accountant not in ("rdp", "pld"):
            raise ConfigurationError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
        if not isinstance(conversion, str) or conversion not in ("improved", "classic"):
            raise ConfigurationError(f"conversion must be 'improved' or 'classic', got {conversion!r}")
        if accountant == "pld" and conversion != "improved":
            raise ConfigurationError("conversion applies to the RDP accountant only")
        self.kind: AccountantKind = accountant
        self.conversion: Conversion = conversion
        self._events: list[PrivacyEvent] = []
        self._rdp: np.ndarray | None = None
        self._pld: Any = None
        self._unamplified: Accountant | None = None  # kept in step lazily by epsilon(amplified=False)

    def __repr__(self) -> str:
        return f"Accountant({self.kind!r}, events={len(self._events)})"

    def __len__(self) -> int:
        return len(self._events)

    def supports(self, event: object) -> bool:
        """Whether this accountant can compose `event`."""
        if self.kind == "pld":
            return isinstance(event, GaussianEvent)
        return isinstance(event, (GaussianEvent, DDGEvent, SkellamEvent))

    def _check(self, event: object) -> PrivacyEvent:
        if not isinstance(event, PrivacyEvent):
            raise InvalidInput(f"expected a privacy event, got {type(event).__name__}")
        if not self.supports(event):
            raise ConfigurationError(
                f"the {self.kind!r} accountant cannot compose a {event.mechanism!r} event; use accountant='rdp'"
            )
        return event

    def record(self, event: PrivacyEvent) -> None:
        """Compose `event` and append it to the ledger. ConfigurationError if unsupported."""
        event = self._check(event)
        if self.kind == "rdp":
            self._rdp = self._rdp_after(event)
        else:
            self._pld = self._pld_after(event)
        self._events.append(event)

    def _rdp_after(self, event: PrivacyEvent) -> np.ndarray:
        with _numerics(event, "rdp"):
            add = _event_rdp(event._math_key())
        if np.isnan(add).any():
            raise ConfigurationError(f"the RDP of {event!r} is NaN: its parameters are outside what the "
                                     "accountant can evaluate; use values of moderate size")
        return add.copy() if self._rdp is None else self._rdp + add

    def _pld_after(self, event: PrivacyEvent) -> Any:
        acc = copy.deepcopy(self._pld) if self._pld is not None else _dpa().pld.PLDAccountant()
        with _numerics(event, "pld"):
            acc.compose(_dp_event(event))  # type: ignore[arg-type]
        return acc

    def epsilon(self, delta: float, *, amplified: bool = True) -> float:
        """Epsilon spent so far at `delta` (0.0 for an empty ledger).

        ``amplified=False``: the epsilon of the same ledger with every event's ``sampling_rate``
        taken as 1.0 (:meth:`unamplified`), the guarantee towards a party that learns who was
        sampled; equal to the amplified one when every event has rate 1. See ``protocols/dp.md`` section 1.
        """
        delta = _check_delta(delta)
        if not amplified and any(e.sampling_rate < 1.0 for e in self._events):
            if self._unamplified is None:
                self._unamplified = Accountant(self.kind, conversion=self.conversion)
            return _unamplified_into(self._unamplified, self._events).epsilon(delta)
        if not self._events:
            return 0.0
        if self.kind == "rdp":
            assert self._rdp is not None
            return _rdp_to_epsilon(self._rdp, delta, self.conversion)
        return float(self._pld.get_epsilon(delta))

    def unamplified(self) -> Accountant:
        """A new accountant (same kind and conversion) over this ledger with every ``sampling_rate``
        taken as 1.0: no amplification by subsampling. See ``protocols/dp.md`` section 1."""
        return _unamplified_into(Accountant(self.kind, conversion=self.conversion), self._events)

    def epsilon_after(self, event: PrivacyEvent, delta: float) -> float:
        """Epsilon at `delta` if `event` were recorded too (the ledger is not changed)."""
        delta = _check_delta(delta)
        event = self._check(event)
        if self.kind == "rdp":
            return _rdp_to_epsilon(self._rdp_after(event), delta, self.conversion)
        return float(self._pld_after(event).get_epsilon(delta))

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The recorded events, in order."""
        return tuple(self._events)

    @property
    def ledger(self) -> list[dict[str, Any]]:
        """One JSON-serializable dict per recorded event (``"mechanism"`` plus its parameters)."""
        return [e.to_dict() for e in self._events]

    @classmethod
    def from_ledger(
        cls, ledger: Iterable[Mapping[str, Any]], accountant: AccountantKind = "rdp", *,
        conversion: Conversion = "improved",
    ) -> Accountant:
        """An accountant that has recorded every event of `ledger` (InvalidInput if malformed)."""
        acc = cls(accountant, conversion=conversion)
        if isinstance(ledger, (str, bytes, Mapping)):
            raise InvalidInput("a ledger is a list of event dicts")
        for entry in ledger:
            acc.record(event_from_dict(entry))
        return acc


def compute_epsilon(
    *,
    mechanism: Literal["gaussian", "ddg", "skellam"] = "gaussian",
    noise_multiplier: float,
    sampling_rate: float = 1.0,
    steps: int = 1,
    delta: float,
    accountant: AccountantKind = "rdp",
    l2_clip: float | None = None,
    dimension: int | None = None,
    granularity: float | None = None,
    beta: float = 0.0,
    num_clients: int | None = None,
    conversion: Conversion = "improved",
) -> float:
    """Epsilon at `delta` of `steps` Poisson-sampled releases of one mechanism.

    ``"gaussian"``: sensitivity 1, noise std `noise_multiplier` (dp-accounting).
    ``"ddg"`` / ``"skellam"``: vectors of L2 norm <= `l2_clip` in `dimension`
    coordinates, scaled by 1/`granularity`, randomly rounded (conditional bound
    `beta`), total noise std ``noise_multiplier * l2_clip``; ``"ddg"`` also needs
    `num_clients`, the number of noise shares. Raises ConfigurationError for
    missing or invalid parameters, or PLD with a mechanism it does not support.
    """
    if not isinstance(mechanism, str):  # before ==: a numpy array compares elementwise
        raise ConfigurationError(f"mechanism must be 'gaussian', 'ddg' or 'skellam', got {mechanism!r}")
    if mechanism == "gaussian":
        extra = {k: v for k, v in dict(l2_clip=l2_clip, dimension=dimension, granularity=granularity,
                                        num_clients=num_clients).items() if v is not None}
        if extra or not (isinstance(beta, int | float) and beta == 0):  # no `if beta`: an array has no truth
            raise ConfigurationError(f"the gaussian mechanism takes no {sorted(extra) or ['beta']}")
        event: PrivacyEvent = GaussianEvent(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                                            steps=steps)
    elif mechanism in ("ddg", "skellam"):
        missing = [k for k, v in dict(l2_clip=l2_clip, dimension=dimension, granularity=granularity).items()
                   if v is None]
        if missing:
            raise ConfigurationError(f"mechanism {mechanism!r} needs {', '.join(missing)}")
        cls = DDGEvent if mechanism == "ddg" else SkellamEvent
        event = cls(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps,
                    l2_clip=l2_clip, dimension=dimension, granularity=granularity, beta=beta,  # type: ignore[arg-type]
                    num_clients=num_clients)
    else:
        raise ConfigurationError(f"mechanism must be 'gaussian', 'ddg' or 'skellam', got {mechanism!r}")
    acc = Accountant(accountant, conversion=conversion)
    acc.record(event)
    with _numerics(event, acc.kind):
        eps = acc.epsilon(delta)
    if not math.isfinite(eps):  # no finite epsilon at this delta: a useless answer, named here
        raise ConfigurationError(
            f"{event!r} has no finite epsilon at delta={delta!r} under the {acc.kind!r} accountant: more noise, "
            "fewer steps or a larger delta" + (", or accountant='rdp'" if acc.kind == "pld" else ""))
    return eps
