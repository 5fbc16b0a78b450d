"""Protocol-level bad input (issue 21, rows 1-7): each call is refused with a SecureFedError subclass whose
message names the problem, or accepted with the sum of the float64 reference (within the protocol's
error_bound). Every row runs for every protocol it applies to. Spec: ``protocols/base.md`` ("Inputs")."""

import numpy as np
import pytest
import torch

import securefed as sf
from securefed.encoding import check_sum
from securefed.errors import ConfigurationError, InvalidInput
from securefed.protocols import LazyInputs, simulate_aggregation

pytestmark = pytest.mark.filterwarnings("ignore:.*simulated PKI")

N, DIM = 5, 4
BIG = 1.7e308  # five of these overflow float64

# Every protocol, with a value_range that holds the inputs below; BFV once per client-input path.
FACTORIES = {
    "plain": lambda vr=1.0: sf.protocols.Plain(),
    "secagg": lambda vr=1.0: sf.protocols.SecAgg(value_range=vr),
    "secagg+": lambda vr=1.0: sf.protocols.SecAggPlus(value_range=vr),
    "ckks": lambda vr=1.0: sf.protocols.CKKS(value_range=vr),
    "bfv": lambda vr=1.0: sf.protocols.BFV(value_range=vr),
    "bfv-masked": lambda vr=1.0: sf.protocols.BFV(value_range=vr, key_holder="masked"),
}
ALL = sorted(FACTORIES)
WITH_RANGE = [p for p in ALL if p != "plain"]  # protocols that take value_range


def inputs(dtype=np.float64):
    rng = np.random.default_rng(7)
    return [rng.uniform(-0.9, 0.9, DIM).astype(dtype) for _ in range(N)]


def assert_reference_sum(protocol, total, xs):
    """The total is the float64 sum of the inputs as given, within the protocol's error bound."""
    ref = np.zeros(DIM)
    for x in xs:
        ref += np.asarray(x, dtype=np.float64)
    assert total.dtype == np.float64
    assert np.abs(total - ref).max() <= protocol.error_bound(N) + 1e-12 * N


# Row 1: float16, longdouble and big-endian arrays; float16 through LazyInputs --------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, ">f8", ">f4", "<f4", ">f2"])
def test_float_dtypes_and_byte_orders_are_accepted_with_the_reference_sum(name, dtype):
    p = FACTORIES[name]()
    xs = inputs(dtype)
    assert_reference_sum(p, simulate_aggregation(p, xs, seed=1).total, xs)


@pytest.mark.parametrize("name", ALL)
def test_float16_through_lazy_inputs_is_accepted_with_the_reference_sum(name):
    p = FACTORIES[name]()
    xs = inputs(np.float16)
    res = simulate_aggregation(p, LazyInputs(N, DIM, lambda i: xs[i]), seed=1)
    assert_reference_sum(p, res.total, xs)


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max, reason="longdouble is float64 here")
@pytest.mark.parametrize("name", ALL)
def test_a_longdouble_beyond_float64_is_refused_by_name(name):
    xs = [np.full(DIM, np.longdouble("1e400"))] * N
    with pytest.raises(InvalidInput, match="input coordinate 0 is 1e\\+400, beyond float64's range"):
        simulate_aggregation(FACTORIES[name](), xs, seed=1)


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, object])
def test_non_float_arrays_stay_refused(dtype):
    with pytest.raises(InvalidInput, match="expected a 1-D float array"):
        simulate_aggregation(sf.protocols.SecAgg(), [np.zeros(DIM, dtype=dtype)] * N, seed=1)


# Row 2: seed and session_id ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", [-1, "abc", True, 1.5])
def test_a_bad_seed_is_a_configuration_error(name, seed):
    with pytest.raises(ConfigurationError, match=f"seed must be None, a non-negative int or bytes, got {seed!r}"):
        simulate_aggregation(FACTORIES[name](), inputs(), seed=seed)


@pytest.mark.parametrize("name", ALL)
def test_a_session_id_given_as_str_is_a_configuration_error(name):
    with pytest.raises(ConfigurationError, match="session_id must be 32 bytes, got a str"):
        simulate_aggregation(FACTORIES[name](), inputs(), seed=1, session_id="a" * 32)


def test_session_id_as_bytes_like_is_accepted_and_the_round_spec_refuses_a_str():
    p, xs = sf.protocols.SecAgg(), inputs()
    for sid in (bytearray(32), memoryview(bytes(32))):
        res = simulate_aggregation(p, xs, seed=1, session_id=sid)
        assert res.spec.session_id == bytes(32)
        assert_reference_sum(p, res.total, xs)
    with pytest.raises(ConfigurationError, match="session_id must be 32 bytes, got a str"):
        sf.protocols.RoundSpec(n=2, dim=2, session_id="a" * 32)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="round_index must be an int"):
        sf.protocols.RoundSpec(n=2, dim=2, session_id=bytes(32), round_index="1")  # type: ignore[arg-type]


def test_a_numpy_integer_seed_is_the_same_as_the_int():
    p, xs = sf.protocols.SecAgg(), inputs()
    a = simulate_aggregation(p, xs, seed=np.int64(3))
    b = simulate_aggregation(p, xs, seed=3)
    assert a.server_view.digests == b.server_view.digests


# Row 3: dropouts as a list -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dropouts", [[1], (1,), {1}, "1"])
def test_dropouts_that_are_not_a_mapping_are_invalid_input(name, dropouts):
    p = FACTORIES[name]()
    with pytest.raises(InvalidInput, match=f"dropouts must be a mapping {{client: phase}} such as "
                                           f"{{1: '{p.phases[0]}'}}, got a {type(dropouts).__name__}"):
        simulate_aggregation(p, inputs(), dropouts=dropouts, seed=1)


def test_a_bool_dropout_key_is_not_client_one():
    with pytest.raises(InvalidInput, match="dropout key True is not a client index"):
        simulate_aggregation(sf.protocols.Plain(), inputs(), dropouts={True: "upload"}, seed=1)


# Row 4: torch tensors with requires_grad, bfloat16 ----------------------------------------------------

TENSORS = {
    "requires_grad": lambda x: torch.tensor(x, requires_grad=True),
    "bfloat16": lambda x: torch.tensor(x).to(torch.bfloat16),
    "float16": lambda x: torch.tensor(x).to(torch.float16),
    "bfloat16_requires_grad": lambda x: torch.tensor(x).to(torch.bfloat16).requires_grad_(True),
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", sorted(TENSORS))
def test_torch_tensors_are_detached_and_widened_with_the_reference_sum(name, kind):
    p = FACTORIES[name]()
    ts = [TENSORS[kind](x) for x in inputs()]
    res = simulate_aggregation(p, ts, seed=1)
    assert_reference_sum(p, res.total, [t.detach().double().numpy() for t in ts])
    assert all(t.grad is None for t in ts)  # only read: nothing flowed back into the graph


@pytest.mark.parametrize("name", ["plain", "secagg", "bfv"])
def test_torch_tensors_through_lazy_inputs_and_as_one_2d_tensor(name):
    p = FACTORIES[name]()
    ts = [TENSORS["bfloat16_requires_grad"](x) for x in inputs()]
    ref = [t.detach().double().numpy() for t in ts]
    assert_reference_sum(p, simulate_aggregation(p, LazyInputs(N, DIM, lambda i: ts[i]), seed=1).total, ref)
    stacked = torch.stack([t.detach() for t in ts]).requires_grad_(True)
    assert_reference_sum(p, simulate_aggregation(p, stacked, seed=1).total, ref)


def test_an_integer_tensor_is_refused_by_dtype():
    with pytest.raises(InvalidInput, match="dtype int64"):
        simulate_aggregation(sf.protocols.SecAgg(), [torch.zeros(DIM, dtype=torch.int64)] * N, seed=1)


# Row 5: record="bogus" -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_an_unknown_record_mode_is_a_configuration_error(name):
    with pytest.raises(ConfigurationError, match="record must be 'full' or 'digest' .*got 'bogus'"):
        simulate_aggregation(FACTORIES[name](), inputs(), seed=1, record="bogus")  # type: ignore[arg-type]


# Row 6 and "a sum that overflows to inf or NaN is an error, never a result" ------------------------------

@pytest.mark.parametrize("name", [p for p in ALL if p != "ckks"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_sum_that_overflows_float64_is_invalid_input(name, sign):
    xs = [np.full(DIM, sign * BIG)] * N  # each finite and inside value_range; their sum is not finite
    with pytest.raises(InvalidInput, match=f"the sum of {N} inputs is {'-' if sign < 0 else ''}inf at coordinate 0: "
                                           "finite inputs overflowed float64"):
        simulate_aggregation(FACTORIES[name](BIG), xs, seed=1)


def test_ckks_refuses_a_value_range_whose_sums_could_overflow():
    # CKKS derives its scale from n * value_range: such a range leaves no scale at all (refused per round).
    with pytest.raises(ConfigurationError, match="lower value_range"):
        simulate_aggregation(FACTORIES["ckks"](BIG), [np.full(DIM, BIG)] * N, seed=1)


@pytest.mark.parametrize("name", [p for p in ALL if p != "ckks"])
def test_large_inputs_whose_sum_fits_are_accepted(name):
    p = FACTORIES[name](BIG)
    xs = [np.full(DIM, BIG / 8)] * N
    assert_reference_sum(p, simulate_aggregation(p, xs, seed=1).total, xs)


class _InfServer:
    """A server of a third-party protocol whose result is not finite: simulate_aggregation refuses it."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def result(self):
        total, included = self._inner.result()
        return np.full_like(total, np.nan), included


def test_simulate_aggregation_refuses_a_non_finite_total_from_any_protocol():
    class NaNPlain(sf.protocols.Plain):
        def server(self, spec, *, rng):
            return _InfServer(super().server(spec, rng=rng))

    with pytest.raises(InvalidInput, match="the sum of 5 inputs is nan at coordinate 0: a sum must be finite"):
        simulate_aggregation(NaNPlain(), inputs(), seed=1)


def test_check_sum_names_the_first_non_finite_coordinate():
    total = np.zeros(70_000)
    assert check_sum(total) is total
    total[66_000] = np.nan
    with pytest.raises(InvalidInput, match="the sum is nan at coordinate 66000"):
        check_sum(total)


# Row 7: error_bound(-3), value_range=True -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [-3, 0, True, 2.5, "5"])
def test_error_bound_of_a_non_positive_or_non_integer_count_is_refused(name, n):
    with pytest.raises(ConfigurationError, match=f"the number of clients must be a positive integer, got {n!r}"):
        FACTORIES[name]().error_bound(n)


@pytest.mark.parametrize("name", ALL)
def test_error_bound_is_non_negative_for_valid_counts(name):
    p = FACTORIES[name]()
    assert 0 <= p.error_bound(1) <= p.error_bound(N)


@pytest.mark.parametrize("name", WITH_RANGE)
@pytest.mark.parametrize("value_range", [True, np.True_, float("inf"), 0, -1.0, "1"])
def test_a_bool_or_bad_value_range_is_refused(name, value_range):
    with pytest.raises(ConfigurationError, match=f"value_range must be a finite number > 0.*got {value_range!r}"):
        FACTORIES[name](value_range)


@pytest.mark.parametrize("name", WITH_RANGE)
def test_a_numpy_float_value_range_is_the_float(name):
    assert FACTORIES[name](np.float32(2.0)).error_bound(N) == FACTORIES[name](2.0).error_bound(N)


# Row 8 (the public-API fuzz): an array where a name belongs ---------------------------------------------
# `array in (...)` and `array == "..."` compare elementwise, so these were numpy's "truth value of an array
# is ambiguous" ValueError.

ARRAY = np.array([1.0, 2.0])


@pytest.mark.parametrize("make", [lambda: sf.protocols.SecAgg(adversary=ARRAY),
                                  lambda: sf.protocols.SecAggPlus(adversary=np.array([]))])
def test_an_array_as_adversary_is_a_configuration_error(make):
    with pytest.raises(ConfigurationError, match="adversary must be one of"):
        make()


@pytest.mark.parametrize("name", ALL)
def test_an_array_as_record_or_dropout_phase_is_refused(name):
    p = FACTORIES[name]()
    with pytest.raises(ConfigurationError, match="record must be 'full' or 'digest'"):
        simulate_aggregation(p, inputs(), seed=1, record=ARRAY)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"dropout phase array\(\[1., 2.\]\) is not one of"):
        simulate_aggregation(p, inputs(), dropouts={1: ARRAY}, seed=1)  # type: ignore[dict-item]


@pytest.mark.parametrize("junk", [torch.device("cpu"), torch.nn.Linear(2, 2), torch.float32])
def test_a_torch_object_that_is_not_a_tensor_is_invalid_input(junk):
    # was AttributeError ('torch.device' object has no attribute 'detach')
    with pytest.raises(InvalidInput,
                       match=f"expected a 1-D numpy float array or torch tensor, got {type(junk).__name__}"):
        simulate_aggregation(sf.protocols.Plain(), [np.zeros(DIM)] * (N - 1) + [junk], seed=1)
