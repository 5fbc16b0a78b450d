"""X25519 key agreement with HKDF-SHA256, bound to a purpose, a session and the two parties.

``agree(a_sk, b_pk, ...) == agree(b_sk, a_pk, ...)``: the derivation orders the two
party ids, so both ends get the same key. The HKDF ``info`` is

    b"securefed/kex/" + label + b"\\x00" + session_id + party_bytes(lo) + party_bytes(hi)

with ``lo, hi`` the two parties in canonical order, so a key never carries over
between purposes, sessions or pairs (``session_id`` may be any context bytes: SecAgg
passes its tag, session id and round index) (Bonawitz et al. 2017, Sec. 3; fcp/secagg
hashes the ECDH secret into the AES key the same way). See ``protocols/secagg.md``.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.crypto._ids import party_bytes
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected

__all__ = [
    "KEY_BYTES",
    "X25519PrivateKey",
    "agree",
    "generate_private_key",
    "load_private_key",
    "private_bytes",
    "public_bytes",
]

#: Raw size of an X25519 public or private key.
KEY_BYTES = 32


def generate_private_key(rng: RandomSource) -> X25519PrivateKey:
    """A fresh X25519 private key from `rng` (reproducible when `rng` is seeded)."""
    return X25519PrivateKey.from_private_bytes(rng.token_bytes(KEY_BYTES))


def load_private_key(data: bytes) -> X25519PrivateKey:
    """The private key with raw bytes `data` (32 bytes; X25519 clamps any value)."""
    if len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(bytes(data))


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32 bytes of a private key (secret: keep it on its party)."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32 bytes of the public key of `key`."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _order(a: int | str, b: int | str) -> tuple[bytes, bytes]:
    pa, pb = party_bytes(a), party_bytes(b)
    if pa == pb:
        raise ValueError("key agreement needs two different parties")
    return (pa, pb) if pa < pb else (pb, pa)


def agree(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    label: str,
    session_id: bytes,
    party_a: int | str,
    party_b: int | str,
    length: int = 32,
) -> bytes:
    """A `length`-byte key shared by `party_a` and `party_b` for `label` in `session_id`.

    `peer_public` is the other party's raw public key. Raises MessageRejected for a
    public key that is malformed or of small order (the shared secret would be zero).
    """
    if not label or "\x00" in label:
        raise ValueError("label must be a non-empty string without NUL")
    lo, hi = _order(party_a, party_b)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:
        raise MessageRejected("invalid public key") from None
    info = b"securefed/kex/" + label.encode() + b"\x00" + bytes(session_id) + lo + hi
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)
