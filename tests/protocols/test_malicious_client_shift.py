"""Where a malicious client stands (issue 20, point 6): securefed does not validate inputs, so one
client that sends an arbitrary residue r in place of its encoding is accepted and moves the decoded
total anywhere in the modulus's range. For the masking protocols and BFV the total becomes
centered(S + r mod 2^k) / s, S the others' encodings, so it lies in [-2^(k-1), 2^(k-1) - 1] / s and
the shift from the honest total T is at most 2^(k-1)/s + |T| <= 2^(k-1)/s + n c (an honest, in-range
client moves it by at most 2c). The bound is checked against measured shifts and shown to be
reached. CKKS has no modulus: the key holder releases any sum within n c + error_bound(n).
Spec: ``protocols/secagg.md`` ("Threat models"); proof: ``proofs/secagg.md`` (Lemma 2b)."""

import numpy as np
import pytest

import securefed as sf
from securefed.encoding import FixedPoint, IntegerEncoder
from securefed.protocols import AggregationProtocol, simulate_aggregation

pytestmark = pytest.mark.filterwarnings("ignore:.*simulated PKI")

N, DIM, BAD = 5, 6, 2
C, B = 1.0, 16  # value_range, value_bits (the defaults)

FACTORIES = {
    "secagg": lambda: sf.protocols.SecAgg(value_range=C, value_bits=B),
    "secagg+": lambda: sf.protocols.SecAggPlus(value_range=C, value_bits=B),
    "bfv": lambda: sf.protocols.BFV(value_range=C, value_bits=B),
    "bfv-masked": lambda: sf.protocols.BFV(value_range=C, value_bits=B, key_holder="masked"),
}


class ArbitraryResidue(IntegerEncoder):
    """A malicious client's encoder: whatever its input, it sends the residues `r` (mod 2^k)."""

    def __init__(self, inner: FixedPoint, r: np.ndarray) -> None:
        self.inner, self.r = inner, r

    def modulus_bits(self, n):
        return self.inner.modulus_bits(n)

    def encode(self, x, *, n, rng):
        return self.r.astype(sf.encoding.storage_dtype(self.modulus_bits(n)))

    def decode(self, s, *, n, count):
        return self.inner.decode(s, n=n, count=count)

    def error_bound(self, n):
        return self.inner.error_bound(n)


def one_malicious(honest: AggregationProtocol, bad: AggregationProtocol) -> AggregationProtocol:
    """`honest` for the server and every client but BAD, whose client comes from `bad`."""

    class OneMalicious(AggregationProtocol):
        name, phases, input_phase = honest.name, honest.phases, honest.input_phase

        def server(self, spec, *, rng):
            return honest.server(spec, rng=rng)

        def client(self, spec, client, x=None, *, rng):
            return (bad if client == BAD else honest).client(spec, client, x, rng=rng)

        def auxiliary(self, spec, *, rng):
            return honest.auxiliary(spec, rng=rng)

    return OneMalicious()


def on_grid(rng, scale):
    """Honest inputs in [0, c] that are multiples of 1/s: encoded exactly (no rounding), so S is known."""
    m = rng.integers(0, 2 ** (B - 1), size=(N, DIM))
    return m, [row / scale for row in m]


def shift_bound(k, scale, honest_total):
    """Largest |decoded total - honest total| one client can cause: the total stays in [-2^(k-1), 2^(k-1)) / s."""
    return (2 ** (k - 1) + np.abs(honest_total * scale)) / scale


def run_with_residue(name, r, xs):
    honest = FACTORIES[name]()
    enc = honest.encoder
    return simulate_aggregation(one_malicious(honest, honest.with_encoder(ArbitraryResidue(enc, r))), xs, seed=3)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_an_arbitrary_residue_is_accepted_and_shifts_the_total_within_the_modulus_bound(name):
    enc = FACTORIES[name]().encoder
    k, s = enc.modulus_bits(N), enc.scale
    rng = np.random.default_rng(20)
    m, xs = on_grid(rng, s)
    honest_total = m.sum(axis=0) / s
    others = m.sum(axis=0) - m[BAD]
    extremes = np.array([0, 1, 2 ** (k - 1) - 1, 2 ** (k - 1), 2**k - 1, 2 ** (B - 1)], dtype=np.uint64)
    for trial in range(3):
        r = rng.integers(0, 2**k, size=DIM, dtype=np.uint64) if trial else extremes[np.arange(DIM) % extremes.size]
        res = run_with_residue(name, r, xs)
        assert res.included == tuple(range(N))  # nothing in the protocol refuses it
        # The total is fully the malicious client's choice within the modulus: centered(S + r) / s.
        t = (others + r.astype(np.int64)) % 2**k
        predicted = np.where(t >= 2 ** (k - 1), t - 2**k, t) / s
        np.testing.assert_allclose(res.total, predicted, rtol=0, atol=1e-9)
        shift = np.abs(res.total - honest_total)
        assert (shift <= shift_bound(k, s, honest_total) + 1e-9).all()
        assert (shift <= (2**k - 1) / s + 1e-9).all()  # the bound for any honest total


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_the_bound_is_reached_so_the_shift_is_not_prevented(name):
    enc = FACTORIES[name]().encoder
    k, s = enc.modulus_bits(N), enc.scale
    m, xs = on_grid(np.random.default_rng(6), s)
    honest_total = m.sum(axis=0) / s  # >= 0: the farthest reachable total is -2^(k-1)/s
    others = m.sum(axis=0) - m[BAD]
    r = ((-(2 ** (k - 1)) - others) % 2**k).astype(np.uint64)
    res = run_with_residue(name, r, xs)
    np.testing.assert_allclose(res.total, -(2 ** (k - 1)) / s, rtol=0, atol=1e-9)
    shift = np.abs(res.total - honest_total)
    np.testing.assert_allclose(shift, shift_bound(k, s, honest_total), rtol=0, atol=1e-9)
    # Far beyond what any in-range input could do (2c), and beyond the range of an honest total (n c).
    assert (shift > N * C).all()
    # With the defaults and n = 5: k = 19, 2^(k-1)/s = 2^18/32767 ~ 8.0002, so one client moves the
    # total to ~ -8.0 whatever the others sent.
    assert k == B + 3 and abs(2 ** (k - 1) / s - 8.000244) < 1e-6


def test_an_honest_client_moves_the_total_by_at_most_two_value_ranges():
    # The comparison point: an in-range input moves the total by at most 2c (plus rounding); outside, it is refused.
    p = FACTORIES["secagg"]()

    def total(bad_input):
        return simulate_aggregation(p, [bad_input if i == BAD else np.zeros(DIM) for i in range(N)], seed=1).total

    assert (np.abs(total(np.full(DIM, C)) - total(np.full(DIM, -C))) <= 2 * C + 2 * p.error_bound(N)).all()
    with pytest.raises(sf.errors.InvalidInput, match="outside the declared range"):
        total(np.full(DIM, 1.5 * C))


def ckks_with_one_malicious(values):
    """CKKS whose client BAD encrypts `values` whatever its input (the range check is the client's own)."""
    honest = sf.protocols.CKKS(value_range=C)

    class Arbitrary(sf.protocols.CKKS):
        def _prepare(self, x, spec, rng):
            return np.array(values, dtype=np.float64)

    bad = Arbitrary(value_range=C)
    bad._simulated_pki = honest._simulated_pki  # one simulated PKI for the run, as copies of a protocol share
    return honest, one_malicious(honest, bad)


def test_ckks_a_malicious_client_moves_the_total_anywhere_the_key_holder_releases():
    # CKKS has no modulus to wrap: the key holder releases a sum within n c + error_bound(n), so one
    # client sets the total anywhere in that range (a shift up to 2 n c + error) and beyond it the round aborts.
    xs = [np.full(DIM, C) for _ in range(N)]
    honest, _ = ckks_with_one_malicious(np.zeros(DIM))
    limit = N * C + honest.error_bound(N)
    target = -N * C  # the farthest total from the honest one (n c), still released
    _, p = ckks_with_one_malicious(np.full(DIM, target - (N - 1) * C))
    res = simulate_aggregation(p, xs, seed=3)
    assert res.included == tuple(range(N))
    np.testing.assert_allclose(res.total, target, rtol=0, atol=honest.error_bound(N))
    assert (np.abs(res.total - N * C) <= 2 * limit).all() and (np.abs(res.total - N * C) >= 2 * N * C - 1e-6).all()
    _, p = ckks_with_one_malicious(np.full(DIM, -2 * limit))
    with pytest.raises(sf.errors.ProtocolAborted, match="the decryptor did not decrypt the aggregate"):  # it refused
        simulate_aggregation(p, xs, seed=3)
