"""What both sides of one SecAgg / SecAgg+ round know, and the keys they derive from it.

Every signature, commitment and derived key binds the protocol tag, the session id
and the round index (:meth:`Round.context`), so nothing carries over between
rounds or between SecAgg and SecAgg+. See ``protocols/secagg.md`` (derivations).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from securefed.crypto import kex
from securefed.crypto.signing import KeyDirectory
from securefed.encoding.fixedpoint import IntegerEncoder
from securefed.encoding.packing import storage_dtype
from securefed.errors import AbortReason, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import RoundSpec
from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.params import GraphParameters

PHASES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking")
ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASKING = range(5)
PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}
_SHA256 = hashes.SHA256()
VERSION = 5  # of the wire format (protocols/secagg.md); any change to a message's bytes bumps it
SECRET_BYTES = 32  # bytes of b_u and of the X25519 mask key


@dataclasses.dataclass(frozen=True)
class Round:
    """Public parameters of one round: spec, graph, threshold, modulus width, encoder, PKI."""

    spec: RoundSpec
    tag: bytes
    params: GraphParameters
    graph: MaskingGraph
    width: int
    encoder: IntegerEncoder
    active: bool
    identities: KeyDirectory | None
    #: Active rounds: valid signatures, from anyone listed, that an unmasking request must carry on the
    #: survivor list (floor((n + C) / 2) + 1: two lists with a quorum each share an honest signer, so every
    #: honest client that unmasks holds the same list). 0: no such check (semi-honest).
    quorum: int = 0

    @property
    def t(self) -> int:
        return self.params.threshold

    @property
    def survivors_needed(self) -> int:
        """Fewest signers of the survivor list with which the round can still unmask: max(t, quorum)."""
        return max(self.params.threshold, self.quorum)

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.width)

    def message(self, phase: int, sender: int, *body: bytes | memoryview) -> bytes:
        """Header and the body made of the `body` pieces, joined in one copy."""
        return b"".join((self.header(phase, sender, sum(len(b) for b in body)), *body))

    def header(self, phase: int, sender: int, body_len: int) -> bytes:
        s = self.spec
        return wire.pack_header(self.tag, VERSION, phase, s.round_index, s.session_id, sender, body_len)

    def body(self, data: bytes, phase: int, sender: int) -> memoryview:
        prefix = self._prefixes.get((phase, sender))
        if prefix is None:  # packed once per phase and sender: the server checks every reply's header
            s = self.spec
            prefix = wire.header_prefix(self.tag, VERSION, phase, s.round_index, s.session_id, sender)
            self._prefixes[phase, sender] = prefix
        return wire.split_message(data, prefix)

    @functools.cached_property
    def _prefixes(self) -> dict[tuple[int, int], bytes]:
        return {}

    def context(self) -> bytes:
        """Tag, session and round: bound into every signature, commitment and derived key."""
        return self._context

    @functools.cached_property
    def _context(self) -> bytes:
        return self.tag + self.spec.session_id + struct.pack(">I", self.spec.round_index)

    @functools.cached_property
    def _commit_prefix(self) -> hashlib._Hash:
        return hashlib.sha256(b"securefed/secagg/commit\x00" + self._context)

    @functools.cached_property
    def _self_mask_info(self) -> bytes:
        return b"securefed/secagg/self-mask\x00" + self._context


def advertise_message(r: Round, party: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return r.context() + struct.pack(">I", party) + c_pk + s_pk


def commitment(r: Round, party: int, b: bytes) -> bytes:
    h = r._commit_prefix.copy()  # (the server checks one per survivor: the prefix is hashed once)
    h.update(struct.pack(">I", party) + b)
    return h.digest()


def self_mask_key(r: Round, party: int, b: bytes) -> bytes:
    # b is 32 uniformly random bytes, a key already: HKDF's expand step alone (RFC 5869, 3.3) binds
    # the context; the extract step is for inputs that are not uniform, such as X25519 outputs.
    info = r._self_mask_info + struct.pack(">I", party)
    return HKDFExpand(algorithm=_SHA256, length=16, info=info).derive(b)


# Both bind the whole context (tag, session, round), like every other derivation of the round.
def mask_key(r: Round, sk: kex.X25519PrivateKey, peer_pk: bytes, a: int, b: int) -> bytes:
    return kex.agree(sk, peer_pk, label="secagg/mask", session_id=r.context(), party_a=a, party_b=b, length=16)


def channel_key(r: Round, sk: kex.X25519PrivateKey, peer_pk: bytes, a: int, b: int) -> bytes:
    return kex.agree(sk, peer_pk, label="secagg/channel", session_id=r.context(), party_a=a, party_b=b)


def refuse(reason: AbortReason, message: str, phase: int) -> ProtocolAborted:
    return ProtocolAborted(reason, message, phase=PHASES[phase])
