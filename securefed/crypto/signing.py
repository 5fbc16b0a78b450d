"""Ed25519 signatures with purpose separation, and a directory of the federation's identity keys.

Every signed message is ``b"securefed/sig/" + purpose + b"\\x00" + message``, so a
signature made for one purpose (advertised keys, a survivor list) never verifies
for another. The active variant of SecAgg needs a PKI (Bonawitz et al. 2017,
Sec. 6): every party knows every other party's long-term verification key from a
source the server does not control. :class:`KeyDirectory` is that PKI as a value.
Failures say only "invalid". See ``protocols/secagg.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, MessageRejected

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "Ed25519PrivateKey",
    "KeyDirectory",
    "generate_signing_key",
    "sign",
    "verify",
    "verify_key_bytes",
]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def _framed(purpose: str, message: bytes) -> bytes:
    if not purpose or "\x00" in purpose:
        raise ValueError("purpose must be a non-empty string without NUL")
    return b"securefed/sig/" + purpose.encode() + b"\x00" + bytes(message)


def generate_signing_key(rng: RandomSource) -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key from `rng`."""
    return Ed25519PrivateKey.from_private_bytes(rng.token_bytes(32))


def verify_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte verification (public) key of `key`."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, message: bytes, *, purpose: str) -> bytes:
    """A 64-byte signature of `message` for `purpose`."""
    return key.sign(_framed(purpose, message))


def verify(public_key: bytes, signature: bytes | memoryview, message: bytes, *, purpose: str) -> None:
    """Check `signature`; raise MessageRejected("invalid signature") if it does not verify."""
    sig = bytes(signature)
    if len(sig) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        raise MessageRejected("invalid signature")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(sig, _framed(purpose, message))
    except (InvalidSignature, ValueError):
        raise MessageRejected("invalid signature") from None


class KeyDirectory:
    """The federation's PKI: every client's verification key, and the signing keys this process holds.

    A deployment gives each node a directory with all public keys and only its own
    signing key (:meth:`restricted_to`); a simulation holds them all (:meth:`generate`).
    The server needs only the public keys.
    """

    def __init__(
        self, public: Mapping[int, bytes], private: Mapping[int, Ed25519PrivateKey] | None = None
    ) -> None:
        self._public = {int(p): bytes(k) for p, k in public.items()}
        for p, k in self._public.items():
            if len(k) != PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"verification key of client {p} must be {PUBLIC_KEY_BYTES} bytes")
        self._private = dict(private or {})
        for p, sk in self._private.items():
            if self._public.get(p) != verify_key_bytes(sk):
                raise ConfigurationError(f"signing key of client {p} does not match its public key")

    @classmethod
    def generate(cls, n: int, rng: RandomSource | None = None) -> KeyDirectory:
        """Identity keys for clients 0..n-1, all held here (simulation and tests only)."""
        rng = rng or RandomSource()
        private = {i: generate_signing_key(rng.child(f"identity/{i}")) for i in range(n)}
        return cls({i: verify_key_bytes(k) for i, k in private.items()}, private)

    def __repr__(self) -> str:
        return f"KeyDirectory(clients={len(self._public)}, signing_keys={sorted(self._private)})"

    def __len__(self) -> int:
        return len(self._public)

    def restricted_to(self, party: int) -> KeyDirectory:
        """What node `party` holds: every public key and only its own signing key."""
        return KeyDirectory(self._public, {party: self.signing_key(party)})

    def public_only(self) -> KeyDirectory:
        """Every public key, no signing key (the server's view)."""
        return KeyDirectory(self._public)

    def covers(self, n: int) -> bool:
        """Whether clients 0..n-1 all have a verification key."""
        return all(i in self._public for i in range(n))

    def verify_key(self, party: int) -> bytes:
        """Client `party`'s verification key; ConfigurationError if it is not registered."""
        try:
            return self._public[party]
        except KeyError:
            raise ConfigurationError(f"client {party} has no verification key in the directory") from None

    def signing_key(self, party: int) -> Ed25519PrivateKey:
        """Client `party`'s signing key; ConfigurationError if this process does not hold it."""
        try:
            return self._private[party]
        except KeyError:
            raise ConfigurationError(
                f"this process holds no signing key for client {party}: give each node a directory "
                "with its own signing key (KeyDirectory.restricted_to)"
            ) from None
