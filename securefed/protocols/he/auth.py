"""What makes an HE key holder safe against an active server: signed statements and the verified sum.

A key holder is a decryption oracle: whatever ciphertext it decrypts, the server learns the
plaintext, and crafted ciphertexts such as ``(0, Encode(1))`` decrypt to the secret key
(CKKS: Li and Micciancio 2021; BFV likewise). No format check tells a crafted ciphertext from
an honest one, so the key holder decrypts only a sum it has formed itself from uploads that
their clients signed for this round, under its own key (``protocols/he.md``, "Authentication").

Every statement is ``tag || session || u32 round || u32 n || u32 dim || u32 party || data``,
signed with Ed25519 under a purpose (``securefed.crypto.signing``):

- ``he/public-context``: the decryptor's ``key_id`` (so the server cannot hand clients its own key);
- ``he/kex``: a client's X25519 key in ``"clients"`` mode (so the server cannot stand in for the
  dealer or for a recipient of the secret key);
- ``he/upload``: SHA-256 of the upload after its signature (``key_id || ciphertexts``).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np

from securefed.crypto import signing
from securefed.crypto.signing import KeyDirectory
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import RoundSpec
from securefed.protocols.he import tenseal as backend
from securefed.protocols.he.contract import HEScheme
from securefed.protocols.he.tenseal import Ring
from securefed.protocols.he.wire import KEY_ID_BYTES, Reader, read_vectors

__all__ = [
    "CONTEXT",
    "KEX",
    "SIG",
    "UPLOAD",
    "check_upload",
    "decrypt_verified",
    "refuse",
    "sign",
    "verify",
]

CONTEXT, KEX, UPLOAD = "he/public-context", "he/kex", "he/upload"
SIG = signing.SIGNATURE_BYTES
_ROUND = struct.Struct(">IIII")


def _statement(tag: bytes, spec: RoundSpec, party: int, data: bytes) -> bytes:
    return b"".join([tag, spec.session_id, _ROUND.pack(spec.round_index, spec.n, spec.dim, party), data])


def sign(directory: KeyDirectory, tag: bytes, spec: RoundSpec, party: int, data: bytes, *, purpose: str) -> bytes:
    """`party`'s signature on `data` in this round (ConfigurationError if this process lacks its key)."""
    return signing.sign(directory.signing_key(party), _statement(tag, spec, party, data), purpose=purpose)


def verify(directory: KeyDirectory, tag: bytes, spec: RoundSpec, party: int, data: bytes, sig: bytes | memoryview,
           *, purpose: str) -> None:
    """MessageRejected unless `sig` is `party`'s signature on `data` in this round."""
    signing.verify(directory.verify_key(party), sig, _statement(tag, spec, party, data), purpose=purpose)


def check_upload(directory: KeyDirectory, tag: bytes, spec: RoundSpec, client: int, upload: memoryview,
                 key_id: bytes) -> Reader:
    """Verify an upload ``signature || key_id || blobs`` of `client`; a reader at its blobs.

    MessageRejected for a bad signature or another key id. The hash covers the bytes as sent, so
    a verified upload is byte for byte the one its client made for this round and key."""
    reader = Reader(upload)
    sig = reader.take(SIG)
    body = reader.rest()
    verify(directory, tag, spec, client, hashlib.sha256(body).digest(), sig, purpose=UPLOAD)
    if bytes(body[:KEY_ID_BYTES]) != key_id:
        raise MessageRejected("invalid message: encrypted under another key")
    out = Reader(body)
    out.take(KEY_ID_BYTES)
    return out


def refuse(why: str) -> ProtocolAborted:
    return ProtocolAborted(AbortReason.REQUEST_REFUSED, f"the key holder refuses to decrypt: {why}")


def decrypt_verified(protocol: HEScheme, spec: RoundSpec, ring: Ring, secret: bytes, key_id: bytes,
                     reader: Reader) -> tuple[bytes, int]:
    """The key holder's whole decrypt phase: (release, count) from ``u32 m || m x (u32 client || blob)``.

    Each upload is verified (signature, key id, ciphertext checks) and added before the next is
    read, so memory is one accumulator plus one upload. Only the sum formed here is decrypted, and
    only when at least ``min_survivors(n)`` distinct clients are in it. MessageRejected for a bad
    upload or layout, ProtocolAborted (REQUEST_REFUSED) for too few uploads or an out-of-range sum."""
    directory = protocol.directory(spec.n)
    ctx = backend.load_context(secret, ring, secret=True)
    count = reader.u32()
    if not 1 <= count <= spec.n:
        raise MessageRejected("invalid message: bad client count")
    acc: list[Any] | None = None
    last = -1
    for _ in range(count):
        client = reader.u32()
        if not last < client < spec.n:
            raise MessageRejected("invalid message: client list not ascending or out of range")
        last = client
        body = check_upload(directory, protocol._TAG, spec, client, reader.blob(), key_id)
        vecs = read_vectors(body, ctx, ring, spec.dim)
        body.end()
        if acc is None:
            acc = vecs
        else:
            for a, v in zip(acc, vecs):
                a.add_(v)
    reader.end()
    need = protocol.min_survivors(spec.n)
    if count < need:
        raise refuse(f"the sum holds {count} uploads, fewer than the {need} this round requires")
    assert acc is not None
    values = np.empty(spec.dim, dtype=np.float64 if ring.scheme == "ckks" else np.int64)
    for (lo, hi), vec in zip(ring.chunks(spec.dim), acc):
        values[lo:hi] = backend.decrypt_chunk(vec)
    return protocol._release(values, spec, count), count
