import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto import shamir
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected


@pytest.mark.parametrize("p,t,holders", [(5, 2, (0, 1, 2)), (7, 3, (0, 2, 3, 5)), (5, 3, (1, 2, 3)), (3, 2, (0, 1))])
def test_any_t_minus_1_shares_are_uniform_whatever_the_secret_exhaustive(p, t, holders):
    """Over all p^(t-1) polynomials, every (t-1)-subset of shares takes each value in GF(p)^(t-1) once."""
    xs = np.array(holders) + 1
    for subset in itertools.combinations(range(len(holders)), t - 1):
        reference = None
        for secret in range(p):
            counts = Counter()
            for coeffs in itertools.product(range(p), repeat=t - 1):
                c = np.array(coeffs, dtype=np.uint64).reshape(t - 1, 1)
                ys = shamir._evaluate(np.array([secret], dtype=np.uint64), c, xs, p)[:, 0]
                counts[tuple(int(ys[i]) for i in subset)] += 1
            assert len(counts) == p ** (t - 1) and set(counts.values()) == {1}
            reference = reference or counts
            assert counts == reference


@pytest.mark.parametrize("p,t,n", [(5, 2, 4), (7, 3, 5), (11, 4, 6)])
def test_any_t_shares_reconstruct_every_secret_exhaustive(p, t, n):
    xs = np.arange(1, n + 1)
    for secret in range(p):
        for coeffs in itertools.product(range(p), repeat=t - 1) if p ** (t - 1) <= 400 else []:
            c = np.array(coeffs, dtype=np.uint64).reshape(t - 1, 1)
            ys = shamir._evaluate(np.array([secret], dtype=np.uint64), c, xs, p)
            for subset in itertools.combinations(range(n), t):
                lam = shamir._lagrange_at_zero([int(xs[i]) for i in subset], p)
                assert int(shamir._combine(lam, ys[list(subset)], p)[0]) == secret


@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=3),
    st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    st.randoms(use_true_random=False),
)
def test_any_t_of_n_shares_reconstruct_32_byte_secrets(secrets, n_t, rnd):
    n, t = n_t
    holders = rnd.sample(range(1000), n)
    shares = shamir.split(secrets, t, holders, RandomSource(rnd.getrandbits(64)))
    assert shares.shape == (n, len(secrets), shamir.chunk_count(32)) and shares.dtype == np.uint32
    assert (shares < shamir.PRIME).all()
    pick = rnd.sample(range(n), t)
    got = shamir.reconstruct([holders[i] for i in pick], shares[pick], t, 32)
    assert got == secrets
    blobs = [shamir.share_to_bytes(shares[i, 0]) for i in range(n)]
    assert all(len(b) == shamir.share_size(32) == 36 for b in blobs)
    assert all((shamir.share_from_bytes(b, 32) == shares[i, 0]).all() for i, b in enumerate(blobs))


def test_one_wrong_share_or_too_few_shares_do_not_give_the_secret():
    secret = bytes(range(32))
    shares = shamir.split([secret], 3, [0, 1, 2, 3], RandomSource(9))
    bad = shares.copy()
    bad[0, 0, 0] = (int(bad[0, 0, 0]) + 1) % shamir.PRIME
    try:
        assert shamir.reconstruct([0, 1, 2], bad[:3], 3, 32) != [secret]
    except MessageRejected:
        pass
    with pytest.raises(ValueError):
        shamir.reconstruct([0, 1], shares[:2], 3, 32)


def test_share_parsing_is_strict():
    with pytest.raises(MessageRejected):
        shamir.share_from_bytes(bytes(35), 32)
    with pytest.raises(MessageRejected):
        shamir.share_from_bytes(b"\xff" * 36, 32)
    with pytest.raises(ValueError):
        shamir.split([bytes(32)], 2, [0, 0, 1], RandomSource(1))
    with pytest.raises(ValueError):
        shamir.split([bytes(32)], 4, [0, 1, 2], RandomSource(1))


@pytest.mark.parametrize("t", [1, 7, 300, 1500])  # 1500: the table of differences in several blocks of rows
def test_lagrange_coefficients_interpolate_at_zero_for_any_threshold(t):
    p = shamir.PRIME
    xs = [int(v) for v in np.random.default_rng(t).choice(np.arange(1, 1 << 24), size=t, replace=False)]
    lam = [int(v) for v in shamir._lagrange_at_zero(xs, p)]
    for k in sorted({0, min(1, t - 1), t // 2, t - 1}):  # sum l_i x_i^k is f(0) for f = z^k, degree < t
        assert sum(l * pow(x, k, p) for l, x in zip(lam, xs)) % p == (1 if k == 0 else 0)


@pytest.mark.parametrize("chunks", [[0] * 8 + [1 << 16], [1 << 30] + [0] * 8, None],
                         ids=["a bit above the secret's 256", "a chunk of 31 bits", "a share not below the prime"])
def test_reconstruction_rejects_shares_that_give_no_valid_secret(chunks):
    """Shares that interpolate to chunks no secret has (or a share outside the field) are refused."""
    holders, t = [0, 1, 2, 3], 3
    if chunks is None:
        shares = shamir.split([bytes(range(32))], t, holders, RandomSource(4))
        shares[1, 0, 3] = shamir.PRIME
    else:
        coeffs = RandomSource(5).integers_below(shamir.PRIME, (t - 1) * 9).reshape(t - 1, 1, 9)
        values = np.array([chunks], dtype=np.uint64)
        shares = shamir._evaluate(values, coeffs, np.array(holders) + 1, shamir.PRIME).astype(np.uint32)
    with pytest.raises(MessageRejected, match="invalid shares"):
        shamir.reconstruct(holders[:t], shares[:t], t, 32)
    ok = shamir.split([bytes(range(32))], t, holders, RandomSource(4))
    assert shamir.reconstruct(holders[1:], ok[1:], t, 32) == [bytes(range(32))]
