"""The TenSEAL calls of the HE protocols: contexts, chunked encryption, strict loading, decryption.

tenseal loads on first use, keeping ``import securefed`` fast. Every object that
comes from another party goes through :func:`load_context` or :func:`load_chunk`,
which raise MessageRejected unless it has exactly this round's parameters: the
scheme, ring degree, coefficient primes, plaintext modulus, key material, and for
a ciphertext its level, size, NTT form and scale. See ``protocols/he.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from securefed.errors import MessageRejected

__all__ = [
    "Ring",
    "decrypt_chunk",
    "encrypt_chunks",
    "key_id",
    "load_chunk",
    "load_context",
    "new_context",
    "public_bytes",
    "secret_bytes",
]


def _ts() -> Any:
    import tenseal
    import tenseal.sealapi  # registers SEAL's types (Modulus) that parameter checks read

    return tenseal


@dataclasses.dataclass(frozen=True)
class Ring:
    """What a round's contexts and ciphertexts must match.

    ``plain_modulus`` is 0 for CKKS; ``scale_bits`` is 0 for BFV.
    """

    scheme: str  # "ckks" or "bfv"
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int = 0
    scale_bits: int = 0

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2 if self.scheme == "ckks" else self.poly_modulus_degree

    @property
    def scale(self) -> float:
        return 2.0**self.scale_bits

    def chunks(self, dim: int) -> list[tuple[int, int]]:
        """``(lo, hi)`` of each ciphertext's slice: every ciphertext but the last is full."""
        return [(lo, min(lo + self.slots, dim)) for lo in range(0, dim, self.slots)]


def new_context(ring: Ring) -> Any:
    """A fresh TenSEAL context with a new secret key (keys from SEAL's OS-seeded generator)."""
    ts = _ts()
    scheme = ts.SCHEME_TYPE.CKKS if ring.scheme == "ckks" else ts.SCHEME_TYPE.BFV
    kwargs = {"plain_modulus": ring.plain_modulus} if ring.scheme == "bfv" else {}
    return ts.context(scheme, ring.poly_modulus_degree, coeff_mod_bit_sizes=list(ring.coeff_mod_bit_sizes),
                      n_threads=1, **kwargs)


def public_bytes(ctx: Any) -> bytes:
    """The public context: parameters and public key; no secret, Galois or relinearization keys."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def secret_bytes(ctx: Any) -> bytes:
    """Parameters and the secret key only (what a decrypting party needs)."""
    return ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


def key_id(public: bytes) -> bytes:
    """SHA-256 of a serialized public context: names the key an upload is encrypted under."""
    return hashlib.sha256(public).digest()


def load_context(data: bytes, ring: Ring, *, secret: bool) -> Any:
    """Load a context sent by another party; MessageRejected unless it matches `ring` exactly.

    ``secret=False``: a public key and nothing secret; ``secret=True``: a secret key and no public
    key. Neither may carry Galois or relinearization keys (sums need none).
    """
    ts = _ts()
    try:
        ctx = ts.context_from(bytes(data), n_threads=1)
        parms = ctx.data.seal_context().key_context_data().parms()
        scheme = parms.scheme()
        degree = parms.poly_modulus_degree()
        bits = tuple(m.bit_count() for m in parms.coeff_modulus())
        plain = parms.plain_modulus().value()
        keys = (ctx.has_secret_key(), ctx.has_public_key(), ctx.has_galois_keys(), ctx.has_relin_keys())
    except Exception:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError/TypeError for bad bytes
        raise MessageRejected("invalid message: not a TenSEAL context") from None
    want_scheme = ts.SCHEME_TYPE.CKKS.value if ring.scheme == "ckks" else ts.SCHEME_TYPE.BFV.value
    if (scheme, degree, bits, plain) != (want_scheme, ring.poly_modulus_degree, ring.coeff_mod_bit_sizes,
                                         ring.plain_modulus):
        raise MessageRejected("invalid message: context parameters differ from this round's")
    if keys != (secret, not secret, False, False):
        raise MessageRejected("invalid message: context carries the wrong keys")
    return ctx


def encrypt_chunks(ctx: Any, ring: Ring, values: np.ndarray) -> list[bytes]:
    """Encrypt `values` (float64 for CKKS, int64 for BFV) one full ciphertext at a time."""
    ts = _ts()
    out = []
    for lo, hi in ring.chunks(values.size):
        if ring.scheme == "ckks":
            vec = ts.ckks_vector(ctx, values[lo:hi].tolist(), ring.scale)
        else:
            vec = ts.bfv_vector(ctx, values[lo:hi].tolist())
        out.append(vec.serialize())
    return out


def load_chunk(ctx: Any, ring: Ring, data: bytes, size: int) -> Any:
    """Load one ciphertext vector of `size` slots; MessageRejected unless it is exactly one fresh-level
    ciphertext of two polynomials for this context (and, for CKKS, at the round's scale)."""
    ts = _ts()
    try:
        if ring.scheme == "ckks":
            vec = ts.ckks_vector_from(ctx, data)
        else:
            vec = ts.bfv_vector_from(ctx, data)
        cts = vec.ciphertext()
        ok = vec.size() == size and len(cts) == 1
        if ok:
            ct = cts[0]
            ok = (ct.size() == 2 and ct.parms_id() == ctx.data.seal_context().first_parms_id()
                  and ct.is_ntt_form() == (ring.scheme == "ckks"))
            if ring.scheme == "ckks":
                ok = ok and ct.scale == ring.scale
    except Exception:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError/TypeError for bad bytes
        raise MessageRejected("invalid message: not a ciphertext") from None
    if not ok:
        raise MessageRejected("invalid message: ciphertext does not match this round's parameters")
    return vec


def decrypt_chunk(vec: Any) -> list[Any]:
    """The slots of `vec` (floats for CKKS, centered ints for BFV), with the key of its context."""
    return vec.decrypt()
