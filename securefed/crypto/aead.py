"""AES-GCM sealed messages between two parties, with associated data naming who, where and why.

A sealed message is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``. The
associated data binds the purpose, session id, round index, sender and recipient:

    b"securefed/aead/" + purpose + b"\\x00" + session_id + round (4 bytes, big-endian)
        + party_bytes(sender) + party_bytes(recipient)

so a sealed message cannot be replayed into another round or session, nor
redirected to another recipient or attributed to another sender: opening it
anywhere else fails. Nonces are 96 random bits from the sender's
:class:`~securefed.crypto.random.RandomSource`. Failures say only "invalid".
See ``protocols/secagg.md`` (share transport).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securefed.crypto._ids import party_bytes
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected

__all__ = ["NONCE_BYTES", "OVERHEAD", "TAG_BYTES", "associated_data", "open_sealed", "seal", "sealed_size"]

NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes a sealed message adds to its plaintext.
OVERHEAD = NONCE_BYTES + TAG_BYTES


def sealed_size(plaintext_len: int) -> int:
    """Size of a sealed message carrying `plaintext_len` bytes."""
    return plaintext_len + OVERHEAD


def associated_data(
    *, purpose: str, session_id: bytes, round_index: int, sender: int | str, recipient: int | str
) -> bytes:
    """The associated data that binds a sealed message (layout in the module docstring)."""
    if not purpose or "\x00" in purpose:
        raise ValueError("purpose must be a non-empty string without NUL")
    return (
        b"securefed/aead/" + purpose.encode() + b"\x00" + bytes(session_id)
        + struct.pack(">I", round_index) + party_bytes(sender) + party_bytes(recipient)
    )


def _aead(key: bytes) -> AESGCM:
    if len(key) not in (16, 24, 32):
        raise ValueError(f"an AES-GCM key is 16, 24 or 32 bytes, got {len(key)}")
    return AESGCM(bytes(key))


def seal(
    key: bytes,
    plaintext: bytes,
    *,
    purpose: str,
    session_id: bytes,
    round_index: int,
    sender: int | str,
    recipient: int | str,
    rng: RandomSource,
) -> bytes:
    """Encrypt and authenticate `plaintext` from `sender` to `recipient` under `key`."""
    ad = associated_data(
        purpose=purpose, session_id=session_id, round_index=round_index, sender=sender, recipient=recipient
    )
    nonce = rng.token_bytes(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, bytes(plaintext), ad)


def open_sealed(
    key: bytes,
    sealed: bytes | memoryview,
    *,
    purpose: str,
    session_id: bytes,
    round_index: int,
    sender: int | str,
    recipient: int | str,
) -> bytes:
    """The plaintext of `sealed`; MessageRejected("invalid ...") if anything does not match."""
    ad = associated_data(
        purpose=purpose, session_id=session_id, round_index=round_index, sender=sender, recipient=recipient
    )
    data = bytes(sealed)
    if len(data) < OVERHEAD:
        raise MessageRejected("invalid sealed message")
    try:
        return _aead(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], ad)
    except InvalidTag:
        raise MessageRejected("invalid sealed message") from None
