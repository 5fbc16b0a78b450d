"""A fuzz test of the public API (issue 21, point 3): every name in API.md, with nasty arguments.

Each test draws a random subset of a callable's keyword arguments (read from ``inspect.signature``, so
new keywords are fuzzed without editing this file), gives each a nasty value (wrong type, negative,
zero, huge, NaN, inf, a bool where a number belongs, an empty container, an unknown string, a numpy
scalar, nested junk) and keeps the others valid. The call must either raise a SecureFedError subclass
or return a result that passes the call's own correctness check; any other exception fails the test
and names the call and its arguments.

``check_protocol`` runs hypothesis itself (it must not run inside ``@given``), so its keywords are
fuzzed over a fixed table of nasty values instead.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import securefed as sf
import securefed.errors
import securefed.optim
import securefed.privacy
from securefed.errors import SecureFedError
from securefed.privacy.clipping import AdaptiveClipping, FlatClipping, PerLayerClipping
from securefed.testing import ConformanceError, check_protocol
from securefed.testing.strategies import input_range

pytestmark = pytest.mark.filterwarnings("ignore:.*simulated PKI", "ignore::RuntimeWarning",
                                        "ignore::securefed.errors.SeededSecretsWarning")

N, DIM = 4, 3
EPS = np.finfo(np.float64).eps

# -- the nasty values ---------------------------------------------------------------------------------

NASTY_FIXED = [
    None, True, False, 0, -1, -0.0, 0.0, 1, 2, 2**31, 2**64, 10**30, -(10**30), 1e-320, 1e308, -1e308,
    math.nan, math.inf, -math.inf, 0.5, 1.5, -0.5,
    np.nan, np.float32("nan"), np.float16(1e4), np.float32(0.25), np.float64(-1.0), np.int64(-1), np.int64(2**62),
    np.int8(0), np.uint64(2**64 - 1), np.bool_(True), np.bool_(False), np.longdouble("1e400"),
    np.array(1.0), np.array([1.0, 2.0]), np.array([]), np.zeros((2, 2)),
    "", "bogus", "nan", "1", "\x00", b"", b"\x00" * 32, bytearray(3),
    # the API's own names, in the wrong place or the right one
    "active", "semi-honest", "cuda", "cuda:1", "cpu", "auto", "pld", "rdp", "classic", "gaussian", "ddg", "skellam",
    "clients", "masked", "decryptor", "fedsgd", "uniform", "full", "digest", "upload", "unmasking",
    [], {}, (), set(), frozenset(), [1], [None], [math.nan], (0, 1), (1, 0), (2, 1), {"a": 1}, {1: "x"},
    1 + 2j, Decimal("NaN"), Decimal("1e400"), Fraction(1, 3), object(), type, int, float, print, lambda *a: None,
    torch.tensor(1.0, requires_grad=True), torch.tensor([math.nan]),
    # the library's own objects in the wrong place (or, by luck, the right one)
    sf.protocols.Plain(), sf.privacy.CentralDP(noise_multiplier=1.0), sf.privacy.SampleLevelDP(noise_multiplier=1.0),
    sf.optim.FedAvgM(server_momentum=0.5), FlatClipping(l2_clip=1.0), torch.device("cpu"), torch.nn.Linear(3, 2),
    TensorDataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), [TensorDataset(torch.zeros(0, 3))],
]


def _junk_leaf():
    return st.one_of(
        st.sampled_from(NASTY_FIXED),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.binary(max_size=8),
    )


EXTREME_NUMBERS = [0, -0.0, 1, -1, 2, 3, 2**31 - 1, 2**53 + 1, 2**63, 2**64, 2**1000, -(2**64), 5e-324, 1e-320,
                   1e-300, 1e-30, 1e-9, 0.999999, 1.000001, 1e9, 1e30, 1e300, 1.7e308, -1e-300, -1e300, math.nan,
                   math.inf, -math.inf, np.float32(1e-30), np.float64(1e300), np.int64(2**63 - 1), np.uint8(255)]


def nasty():
    """One nasty value: a number at float64's edges, a wrong type, an empty container, an unknown string,
    or nested junk."""
    nested = st.recursive(_junk_leaf(), lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.integers(-3, 3), st.text(max_size=3)), inner, max_size=2)), max_leaves=5)
    return st.one_of(st.sampled_from(EXTREME_NUMBERS), _junk_leaf(), nested)


def nasty_kwargs(data, names, *, skip=frozenset(), label="kwargs"):
    """A random non-empty subset of `names`, each with a nasty value."""
    names = sorted(set(names) - set(skip))
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label=f"{label} names")
    return {name: data.draw(nasty(), label=name) for name in chosen}


def keywords(fn, *, drop=("self",)):
    return [p for p in inspect.signature(fn).parameters if p not in drop]


def outcome(fn, *args, **kwargs):
    """(True, result), or (False, error) for a SecureFedError; any other exception fails, naming the call."""
    shown = f"{getattr(fn, '__qualname__', fn)}(*{args!r}, **{kwargs!r})"
    note(f"call: {shown}")
    try:
        return True, fn(*args, **kwargs)
    except SecureFedError as e:
        return False, e
    except Exception as e:  # noqa: BLE001 -- the point of the test
        pytest.fail(f"{shown} raised {type(e).__name__}: {e} (expected a SecureFedError subclass or a result)")


# -- protocols: constructors, then a small valid round --------------------------------------------------

PROTOCOLS = {
    "Plain": sf.protocols.Plain, "SecAgg": sf.protocols.SecAgg, "SecAggPlus": sf.protocols.SecAggPlus,
    "CKKS": sf.protocols.CKKS, "BFV": sf.protocols.BFV,
}
# Valid but slow to build (HE keys for 2^15+ slots); a constructor that accepts them is not a bug.
HE_SLOW_DEGREE = 2**14


def valid_inputs(protocol, seed=0):
    c = input_range(protocol) or 1.0
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.9, 0.9, DIM) * min(c, 1.0) for _ in range(N)]


def as_f64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


def assert_correct_sum(protocol, res, xs):
    """`res` sums the included clients' inputs (as float64) within the protocol's error bound."""
    assert isinstance(res.total, np.ndarray) and res.total.dtype == np.float64
    inc = res.included
    assert isinstance(inc, tuple) and list(inc) == sorted(set(inc)) and all(0 <= i < len(xs) for i in inc)
    rows = [as_f64(xs[i]) for i in inc]
    ref = np.sum(rows, axis=0) if rows else np.zeros_like(res.total)
    assert res.total.shape == ref.shape
    mag = np.sum(np.abs(rows), axis=0) if rows else 0.0
    tol = protocol.error_bound(max(len(inc), 1)) + 4 * EPS * (len(inc) + 1) * mag  # float summation order
    assert np.all(np.abs(res.total - ref) <= tol), f"total {res.total} != reference {ref} (tolerance {tol})"


def too_slow_to_build(kwargs):
    d = kwargs.get("poly_modulus_degree")
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > HE_SLOW_DEGREE


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_protocol_constructors_refuse_nonsense_or_build_a_protocol_that_sums(name, data):
    cls = PROTOCOLS[name]
    params = keywords(cls)
    kwargs = nasty_kwargs(data, params) if params else {}  # Plain() takes no arguments
    if too_slow_to_build(kwargs):
        return
    ok, protocol = outcome(cls, **kwargs)
    if not ok:
        return
    xs = valid_inputs(protocol)
    ran, res = outcome(sf.simulate_aggregation, protocol, xs, seed=1)
    if ran:  # a round these parameters refuse (a threshold above n, say) is a SecureFedError: fine
        assert_correct_sum(protocol, res, xs)


# -- simulate_aggregation: nasty inputs, dropouts, seeds and keywords ----------------------------------

_BUILT: dict[str, object] = {}


def built(name):
    """One protocol instance per kind, built on first use (HE key generation is slow)."""
    if name not in _BUILT:
        _BUILT[name] = {"Plain": lambda: sf.protocols.Plain(), "SecAgg": lambda: sf.protocols.SecAgg(value_range=1.0),
                        "SecAggPlus": lambda: sf.protocols.SecAggPlus(value_range=1.0),
                        "CKKS": lambda: sf.protocols.CKKS(value_range=1.0),
                        "BFV": lambda: sf.protocols.BFV(value_range=1.0)}[name]()
    return _BUILT[name]


DTYPES = [np.float16, np.float32, np.float64, ">f8", np.longdouble, np.int64, np.uint8, np.complex128, np.bool_,
          object, "U3"]
SPECIALS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 1.5, -1.0000001, 5e-324, 0.0, -0.0]


INPUT_KINDS = ["valid", "dtype", "special", "ragged", "shape", "torch", "object", "stacked", "junk_item", "junk",
               "lazy", "tuple"]


@st.composite
def nasty_inputs(draw, kind=None):
    """Client inputs for simulate_aggregation: near-valid lists with one thing wrong, or junk."""
    n = draw(st.integers(0, 5) if kind is None else st.integers(1, 5), label="clients")
    dim = draw(st.integers(0, 4) if kind is None else st.integers(1, 4), label="dim")
    base = [np.linspace(-0.9, 0.9, dim) * (i + 1) / 6 for i in range(n)]
    kind = kind or draw(st.sampled_from(INPUT_KINDS), label="inputs kind")
    if kind == "dtype" and n:
        dt = draw(st.sampled_from(DTYPES), label="dtype")
        which = draw(st.sets(st.integers(0, n - 1), min_size=1), label="clients with that dtype")
        return [x.astype(dt) if i in which else x for i, x in enumerate(base)]
    if kind == "special" and n and dim:
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, dim - 1))
        base[i][j] = draw(st.sampled_from(SPECIALS), label="special value")
        return base
    if kind == "ragged" and n:
        i = draw(st.integers(0, n - 1))
        base[i] = np.zeros(draw(st.integers(0, 6).filter(lambda d: d != dim)))
        return base
    if kind == "shape" and n:
        i = draw(st.integers(0, n - 1))
        base[i] = draw(st.sampled_from([np.zeros((dim, 1)), np.zeros((1, dim)), np.float64(0.5), np.zeros(())]))
        return base
    if kind == "torch":
        dt = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]))
        grad = dt.is_floating_point and draw(st.booleans(), label="requires_grad")
        return [torch.tensor(x).to(dt).requires_grad_(grad) for x in base]
    if kind == "object" and n:
        return [np.array(list(x) + [None], dtype=object) for x in base]
    if kind == "stacked":
        return np.array(base).reshape(n, dim)
    if kind == "junk_item" and n:
        base[draw(st.integers(0, n - 1))] = draw(nasty(), label="junk item")
        return base
    if kind == "junk":
        return draw(nasty(), label="junk inputs")
    if kind == "lazy":  # built by the test (LazyInputs is public API too): (n, dim, make, rows)
        make = draw(st.one_of(st.just(lambda i: base[i] if 0 <= i < n else None), nasty()), label="make")
        return Lazy(draw(st.one_of(st.just(n), nasty()), label="lazy n"),
                    draw(st.one_of(st.just(dim), nasty()), label="lazy dim"), make, base)
    if kind == "tuple":
        return tuple(base)
    return base


class Lazy(tuple):
    """The arguments of a LazyInputs to build inside the test, and the rows it makes."""

    def __new__(cls, n, dim, make, rows):
        return super().__new__(cls, (n, dim, make, rows))


SIMULATE_EXTRA = keywords(sf.simulate_aggregation, drop=("protocol", "inputs", "dropouts", "seed"))
SIMULATE_VALID_EXTRA = {"record": st.sampled_from([None, "full", "digest"]), "round_index": st.integers(0, 9),
                        "session_id": st.one_of(st.none(), st.binary(min_size=32, max_size=32))}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(PROTOCOLS)))
def test_simulate_aggregation_refuses_nonsense_or_returns_the_sum(data, name):
    """One argument nasty (the inputs, the dropouts, the seed or a keyword), the others valid."""
    protocol = built(name)
    phases = list(protocol.phases)
    axis = data.draw(st.sampled_from(["inputs", "inputs", "dropouts", "seed", *SIMULATE_EXTRA]), label="nasty axis")
    inputs = data.draw(nasty_inputs() if axis == "inputs" else nasty_inputs(kind="valid"), label="inputs")
    valid_dropouts = st.one_of(st.none(), st.dictionaries(st.integers(0, 4), st.sampled_from(phases), max_size=2))
    kwargs = {
        "dropouts": data.draw(st.one_of(st.dictionaries(st.integers(-2, 6), st.sampled_from(phases + ["bogus"]),
                                                        max_size=3), nasty()) if axis == "dropouts"
                              else valid_dropouts, label="dropouts"),
        "seed": data.draw(nasty() if axis == "seed" else st.integers(0, 2**70), label="seed"),
    }
    for k in SIMULATE_EXTRA:
        if k == axis or k in SIMULATE_VALID_EXTRA:
            kwargs[k] = data.draw(nasty() if k == axis else SIMULATE_VALID_EXTRA[k], label=k)
    rows = inputs
    if isinstance(inputs, Lazy):
        n, dim, make, rows = inputs
        ok, inputs = outcome(sf.LazyInputs, n, dim, make)
        if not ok:
            return
    ok, res = outcome(sf.simulate_aggregation, protocol, inputs, **kwargs)
    if ok:
        assert_correct_sum(protocol, res, rows)


# -- privacy accounting -----------------------------------------------------------------------------------

EPSILON_BASE = {
    "gaussian": {"mechanism": "gaussian", "noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5},
    "ddg": {"mechanism": "ddg", "noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5,
            "l2_clip": 1.0, "dimension": 100, "granularity": 0.01, "num_clients": 10},
    "skellam": {"mechanism": "skellam", "noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5,
                "l2_clip": 1.0, "dimension": 100, "granularity": 0.01},
}


def pld_too_slow(kwargs):
    """dp-accounting's PLD takes minutes for little noise or many steps: valid, so skipped, not a bug."""
    z, steps = kwargs.get("noise_multiplier"), kwargs.get("steps")
    return isinstance(kwargs.get("accountant"), str) and kwargs["accountant"] == "pld" and (
        (isinstance(z, (int, float)) and z < 0.5) or (isinstance(steps, int) and steps > 1000))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), mechanism=st.sampled_from(sorted(EPSILON_BASE)))
def test_compute_epsilon_refuses_nonsense_or_returns_a_finite_epsilon(data, mechanism):
    kwargs = dict(EPSILON_BASE[mechanism])
    kwargs.update(nasty_kwargs(data, keywords(sf.privacy.compute_epsilon)))
    if pld_too_slow(kwargs):
        return
    ok, eps = outcome(sf.privacy.compute_epsilon, **kwargs)
    if ok:
        assert isinstance(eps, float) and math.isfinite(eps) and eps >= 0.0, eps


# -- DP configurations and clipping -------------------------------------------------------------------------

CONFIGS = {
    "CentralDP": (sf.privacy.CentralDP, {"noise_multiplier": 1.0}),
    "DistributedDP": (sf.privacy.DistributedDP, {"noise_multiplier": 1.0}),
    "SampleLevelDP": (sf.privacy.SampleLevelDP, {"noise_multiplier": 1.0}),
    "FlatClipping": (FlatClipping, {"l2_clip": 1.0}),
    "PerLayerClipping": (PerLayerClipping, {"l2_clip": 1.0}),
    "AdaptiveClipping": (AdaptiveClipping, {}),
}


def check_config(obj):
    """A built configuration is usable: its noise is accountable, its clipping bounds a vector's norm."""
    if isinstance(obj, sf.privacy.PrivacyConfig):
        assert math.isfinite(obj.noise_multiplier) and obj.noise_multiplier > 0 and 0 < obj.delta < 1
        # (a noise_multiplier the accountant cannot evaluate, 1e-300 say, is refused there: fine)
        ok, eps = outcome(sf.privacy.compute_epsilon, noise_multiplier=obj.noise_multiplier, delta=obj.delta, steps=3)
        assert not ok or (math.isfinite(eps) and eps >= 0)
        return
    x = np.array([3.0, -4.0, 12.0, 0.5])
    layout = [2, 2] if isinstance(obj, PerLayerClipping) else None
    ok, clipped = outcome(obj.clip, x, layout)
    if ok:  # (a per-layer clip for another number of layers is refused: fine)
        assert clipped.shape == x.shape and np.all(np.isfinite(clipped))
        assert sf.privacy.l2_norm(clipped) <= obj.bound * (1 + 1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dp_configurations_refuse_nonsense_or_build_a_usable_configuration(name, data):
    cls, base = CONFIGS[name]
    kwargs = {**base, **nasty_kwargs(data, keywords(cls))}
    ok, obj = outcome(cls, **kwargs)
    if ok:
        check_config(obj)


# -- server optimizers --------------------------------------------------------------------------------

OPTIMIZERS = sorted(n for n in sf.optim.__all__
                    if inspect.isclass(getattr(sf.optim, n)) and n != "ServerOptimizer")


@pytest.mark.parametrize("name", OPTIMIZERS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_server_optimizers_refuse_nonsense_or_step_to_finite_weights(name, data):
    cls = getattr(sf.optim, name)
    params = keywords(cls)
    kwargs = nasty_kwargs(data, params) if params else {}
    ok, opt = outcome(cls, **kwargs)
    if not ok:
        return
    w, update = np.linspace(-1, 1, 5), np.full(5, 0.1)
    step_args = data.draw(st.one_of(st.just((w, update, 1)), st.tuples(nasty(), st.just(update), st.just(1)),
                                    st.tuples(st.just(w), nasty(), st.just(1)), st.tuples(st.just(w), st.just(update),
                                                                                          nasty())), label="step")
    stepped, new = outcome(opt.step, *step_args)
    if stepped:
        assert isinstance(new, np.ndarray) and new.shape == w.shape and np.all(np.isfinite(new))


# -- the Trainer: tiny model, one round ---------------------------------------------------------------------

def tiny_federation():
    g = torch.Generator().manual_seed(0)
    return [TensorDataset(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)) for _ in range(3)]


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


USER_CALLBACKS = {"loss_fn", "on_round", "dropouts", "parameters"}

# Valid values whose cost is the point (a million local epochs): skipped, they are not bugs.
COSTLY = {"local_epochs": 3, "torch_threads": 4, "rounds": 2}


def costly(kwargs):
    return any(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > COSTLY[k]
               for k, v in kwargs.items() if k in COSTLY)


@contextlib.contextmanager
def in_temporary_folder():
    """Run in an empty temporary folder: a junk string given as audit_log is written there, not into the repo."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(before)


# too_slow: an accepted example trains a model for a round (a tenth of a second on a loaded CI core)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_trainer_refuses_nonsense_or_fits_one_round(data):
    kwargs = {"model": tiny_model(), "datasets": tiny_federation(), "protocol": sf.protocols.Plain(),
              "progress": False, "batch_size": 4}
    kwargs.update(nasty_kwargs(data, keywords(sf.Trainer)))
    rounds = data.draw(st.one_of(st.just(1), nasty()), label="rounds")
    # A callback that raises when called with the documented arguments (int(record), Linear(name, param))
    # raises its own error through fit, as any Python callback does; what it returns is the Trainer's to check.
    assume(not any(k in USER_CALLBACKS and isinstance(v, type | torch.nn.Module) for k, v in kwargs.items()))
    if costly({**kwargs, "rounds": rounds}):
        return
    threads = torch.get_num_threads()
    with in_temporary_folder(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ok, trainer = outcome(sf.Trainer, **kwargs)
            if not ok:
                return
            fitted, history = outcome(trainer.fit, rounds=rounds)
        finally:
            torch.set_num_threads(threads)
    if fitted:
        assert len(history.rounds) == rounds >= 1
        last = history.rounds[-1]
        assert last.round == rounds and isinstance(last.included, tuple)
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# -- check_protocol: its own hypothesis run, so a fixed table of nasty values per keyword --------------------

CHECK_BASE = {"unprotected": True, "clients": (2, 3), "dimension": (1, 2), "properties": ["correctness"],
              "max_examples": 2}
CHECK_NASTY = [None, True, 0, -1, 10**30, math.nan, "", "bogus", [], {}, (), (3, 1), (0, 0), (1, "x"), ("a",),
               ["nope"], object(), 1.5, b"x"]
# Valid but costly (10^30 examples): not a bug.
CHECK_COSTLY = [("max_examples", CHECK_NASTY[4])]


@pytest.mark.parametrize("keyword", list(keywords(check_protocol)))
def test_check_protocol_refuses_nonsense_keywords(keyword):
    for value in CHECK_NASTY:
        if any(keyword == k and value is v for k, v in CHECK_COSTLY):
            continue
        kwargs = {**CHECK_BASE, keyword: value}
        factory = kwargs.pop("protocol_factory", sf.protocols.Plain)
        try:
            check_protocol(factory, **kwargs)
        except (SecureFedError, ConformanceError):
            # ConformanceError is check_protocol's verdict on a protocol (an AssertionError by design)
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"check_protocol({factory!r}, **{kwargs!r}) with {keyword}={value!r} raised "
                        f"{type(e).__name__}: {e}")


# -- the errors -------------------------------------------------------------------------------------------

def test_every_public_error_is_a_secure_fed_error_and_takes_any_message():
    for name in securefed.errors.__all__:
        cls = getattr(securefed.errors, name)
        if not issubclass(cls, Exception) or issubclass(cls, Warning):  # SeededSecretsWarning: not an error
            continue
        assert issubclass(cls, SecureFedError), name
        for junk in NASTY_FIXED[:20]:
            err = (cls(securefed.errors.AbortReason.INVALID_STATE, junk) if cls is securefed.errors.ProtocolAborted
                   else cls(junk))
            assert isinstance(str(err), str)
