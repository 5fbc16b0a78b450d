"""The client of SecAgg / SecAgg+: one state class per round, and its state as bytes.

A state handles the server's request for its phase and returns the reply and the
next state (fcp/secagg style); any rejected or refused request moves the client to
``_Aborted`` and wipes its secrets, so it reveals nothing afterwards. The honest-
client rules (Bonawitz et al. 2017) live in :func:`_check_survivors` and
:class:`_Unmasking`. See ``protocols/secagg.md`` (client) and ``proofs/secagg.md``.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from securefed.crypto import aead, kex, shamir, signing
from securefed.crypto.masks import mask_aes_key, pairwise_signs
from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import check_finite, check_vector
from securefed.encoding.packing import packed_size
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
)
from securefed.protocols import wire
from securefed.protocols.base import ClientProtocol, RoundSpec
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.packed import (
    ROUNDING_KEY_BYTES,
    Source,
    encoded_source,
    masked_message,
    materialize,
    stored_source,
)
from securefed.protocols.secagg.round import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_INPUT,
    PHASE_INDEX,
    PHASES,
    SECRET_BYTES,
    SHARE_KEYS,
    UNMASKING,
    Round,
    advertise_message,
    channel_key,
    commitment,
    mask_key,
    refuse,
    self_mask_key,
)

__all__ = ["Client", "load_client_state"]

@dataclasses.dataclass
class _ClientData:
    """What a client keeps between phases (all of it secret)."""

    c_sk: bytes = b""  # channel key (X25519), for the shares' AES-GCM transport
    s_sk: bytes = b""  # mask key (X25519), shared t-of-(degree + 1)
    b: bytes = b""  # self-mask seed, shared t-of-(degree + 1)
    encoded: np.ndarray | None = None  # the encoded input (whole-vector encoders, restored states), until sent
    pending: np.ndarray | None = None  # the checked input of a chunked encoder, encoded as it is masked and sent
    peers: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)  # v -> (channel key, mask key)
    held: dict[int, bytes] = dataclasses.field(default_factory=dict)  # v -> b_share || sk_share (incl. own)
    signed: bytes = b""  # the survivor bitmap this client signed (active)


class _State:
    """One round of the client: handles the request of `phase` and returns (message, next state)."""

    phase: ClassVar[int]

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        raise NotImplementedError


class _AdvertiseKeys(_State):
    phase = ADVERTISE

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        if len(body) != 0:
            raise MessageRejected("invalid message: advertise_keys request has a body")
        r, d = c.round, c.data
        c_sk, s_sk = kex.generate_private_key(c.rng), kex.generate_private_key(c.rng)
        d.c_sk, d.s_sk, d.b = kex.private_bytes(c_sk), kex.private_bytes(s_sk), c.rng.token_bytes(SECRET_BYTES)
        c_pk, s_pk = kex.public_bytes(c_sk), kex.public_bytes(s_sk)
        out = c_pk + s_pk
        if r.active:
            key = r.identities.signing_key(c.me)  # type: ignore[union-attr]
            out += signing.sign(key, advertise_message(r, c.me, c_pk, s_pk), purpose="secagg/advertise")
        return r.message(ADVERTISE, c.me, out + W.key_check(c.me, out)), _ShareKeys


class _ShareKeys(_State):
    phase = SHARE_KEYS

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        t0 = time.process_time()
        r, d, me = c.round, c.data, c.me
        rec = 2 * W.KEY + (W.SIG if r.active else 0) + W.CHECK
        ids, rows = W.parse_records(body, rec)
        if not np.isin(ids, r.graph.closed_neighborhood(me)).all():
            raise MessageRejected("invalid message: keys of a client that is not my neighbour")
        mine = kex.public_bytes(kex.load_private_key(d.c_sk)) + kex.public_bytes(kex.load_private_key(d.s_sk))
        own = {mine[: W.KEY], mine[W.KEY :]}
        peers: dict[int, tuple[bytes, bytes]] = {}
        for i, v in enumerate(ids.tolist()):
            entry = W.check_keys(v, rows[i].tobytes())
            c_pk, s_pk = entry[: W.KEY], entry[W.KEY : 2 * W.KEY]
            if r.active:
                signing.verify(r.identities.verify_key(v), entry[2 * W.KEY :],  # type: ignore[union-attr]
                               advertise_message(r, v, c_pk, s_pk), purpose="secagg/advertise")
            if v == me:  # my own record comes back as I sent it, or the server changed my keys
                if c_pk + s_pk != mine:
                    raise MessageRejected("invalid message: my own advertised keys were altered")
                continue
            if c_pk in own or s_pk in own or c_pk == s_pk:
                raise MessageRejected("invalid message: repeated public keys")
            own.update((c_pk, s_pk))
            peers[v] = (c_pk, s_pk)
        if me not in ids.tolist():
            raise MessageRejected("invalid message: my own advertised keys are missing")
        holders = sorted([*peers, me])
        if len(holders) < r.t:
            raise refuse(AbortReason.TOO_FEW_SURVIVORS,
                          f"only {len(holders)} of my neighbourhood advertised keys; sharing needs t = {r.t}",
                          SHARE_KEYS)
        shares = shamir.split([d.b, d.s_sk], r.t, holders, c.rng)
        c_sk, s_sk = kex.load_private_key(d.c_sk), kex.load_private_key(d.s_sk)
        sealed = []
        for i, v in enumerate(holders):
            plain = shares[i].astype("<u4").tobytes()  # b_share || sk_share
            if v == me:
                d.held[me] = plain
                continue
            key = channel_key(r, c_sk, peers[v][0], me, v)
            sealed.append((v, aead.seal(key, plain, purpose="secagg/shares", session_id=r.spec.session_id,
                                        round_index=r.spec.round_index, sender=me, recipient=v, rng=c.rng)))
            # The channel key also opens v's shares to me; the mask key is agreed now, while the
            # input is not ready yet, so the masked-input round only expands masks.
            peers[v] = (key, mask_key(r, s_sk, peers[v][1], me, v))
        d.peers = peers
        c.timings["share_keys"] = time.process_time() - t0
        return r.message(SHARE_KEYS, me, W.records(sealed, prefix=commitment(r, me, d.b))), _MaskedInput


class _MaskedInput(_State):
    phase = MASKED_INPUT

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        t0 = time.process_time()
        r, d, me = c.round, c.data, c.me
        ids, rows = W.parse_records(body, W.SEALED)
        senders = ids.tolist()
        if any(v not in d.peers for v in senders):
            raise MessageRejected("invalid message: shares from a client that did not advertise keys to me")
        opened = [aead.open_sealed(d.peers[v][0], rows[i].tobytes(),
                                   purpose="secagg/shares", session_id=r.spec.session_id,
                                   round_index=r.spec.round_index, sender=v, recipient=me)
                  for i, v in enumerate(senders)]
        if any(len(p) != 2 * W.SHARE for p in opened) or (
                opened and (np.frombuffer(b"".join(opened), dtype="<u4") >= shamir.PRIME).any()):
            raise MessageRejected("invalid share")
        d.held.update(zip(senders, opened))
        if len(d.held) < r.t:
            raise refuse(AbortReason.TOO_FEW_SURVIVORS,
                          f"only {len(d.held)} of my neighbourhood shared keys; t = {r.t} are needed", MASKED_INPUT)
        source = c.source()
        if source is None:
            raise InvalidInput("no input vector: call set_input before the masked_input phase")
        add, sub = pairwise_signs(me, senders, [d.peers[v][1] for v in senders])
        add.append(self_mask_key(r, me, d.b))
        d.encoded = d.pending = None  # the message below is the only copy kept
        dim = r.spec.dim
        # One pass, chunk by chunk: encode, add every mask, pack into the message (protocols/secagg.md, Streaming).
        out = masked_message(source, dim, r.width, r.dtype, [mask_aes_key(k) for k in add],
                             [mask_aes_key(k) for k in sub], r.header(MASKED_INPUT, me, packed_size(dim, r.width)))
        c.timings["mask"] = time.process_time() - t0
        return out, (_Consistency if r.active else _Unmasking)


def _check_survivors(c: Client, survivors: np.ndarray, phase: int) -> None:
    """The honest-client rules for a survivor list (Bonawitz et al. 2017, rounds 3 and 4)."""
    r, d, me = c.round, c.data, c.me
    members = set(survivors.tolist())
    if me not in members:
        raise refuse(AbortReason.REQUEST_REFUSED, "the survivor list omits me, though I sent my masked input", phase)
    mine = [v for v in r.graph.closed_neighborhood(me).tolist() if v in members]
    if any(v not in d.held for v in mine):
        raise refuse(AbortReason.REQUEST_REFUSED,
                      "the survivor list names a neighbour whose shares I never received", phase)
    if len(mine) < r.t:
        raise refuse(AbortReason.TOO_FEW_SURVIVORS,
                      f"only {len(mine)} survivors in my neighbourhood; refusing to reveal shares below t = {r.t}",
                      phase)


def _check_signatures(c: Client, survivors: np.ndarray, body: memoryview, nb: int) -> None:
    """Active unmasking: every signature valid and from a listed client, t of them from my neighbourhood, and
    a quorum over the whole round (so that no other list can also carry one: proofs/secagg.md, Lemma 7)."""
    r, me = c.round, c.me
    ids, sigs = W.parse_records(body, W.SIG, offset=nb)
    listed = set(survivors.tolist())
    if any(v not in listed for v in ids.tolist()):
        raise refuse(AbortReason.CONSISTENCY_CHECK_FAILED, "a signature from a client the list does not name",
                     UNMASKING)
    statement = r.context() + c.data.signed
    for i, v in enumerate(ids.tolist()):
        try:
            signing.verify(r.identities.verify_key(v), sigs[i].tobytes(),  # type: ignore[union-attr]
                           statement, purpose="secagg/survivors")
        except MessageRejected:
            raise refuse(AbortReason.CONSISTENCY_CHECK_FAILED,
                         f"client {v}'s signature on the survivor list is invalid", UNMASKING) from None
    near = np.isin(ids, r.graph.closed_neighborhood(me)).sum()
    if near < r.t:
        raise refuse(AbortReason.CONSISTENCY_CHECK_FAILED,
                     f"only {near} signed survivor lists from my neighbourhood; t = {r.t} are needed", UNMASKING)
    if ids.size < r.quorum:
        raise refuse(AbortReason.CONSISTENCY_CHECK_FAILED,
                     f"only {ids.size} clients signed the survivor list; a quorum of {r.quorum} is needed "
                     "(else another list could carry t signatures elsewhere)", UNMASKING)


class _Consistency(_State):
    phase = CONSISTENCY

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        r = c.round
        _check_survivors(c, W.parse_bitmap(body, r.spec.n), CONSISTENCY)
        c.data.signed = bytes(body)
        sig = signing.sign(r.identities.signing_key(c.me), r.context() + c.data.signed,  # type: ignore[union-attr]
                           purpose="secagg/survivors")
        return r.message(CONSISTENCY, c.me, sig), _Unmasking


class _Unmasking(_State):
    phase = UNMASKING

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        r, d, me = c.round, c.data, c.me
        nb = (r.spec.n + 7) // 8
        if len(body) < nb:
            raise MessageRejected("invalid message: truncated survivor list")
        survivors = W.parse_bitmap(body[:nb], r.spec.n)
        if r.active:
            if bytes(body[:nb]) != d.signed:
                raise refuse(AbortReason.CONSISTENCY_CHECK_FAILED,
                              "the survivor list differs from the one I signed in the consistency check", UNMASKING)
            _check_signatures(c, survivors, body, nb)
        elif len(body) != nb:
            raise MessageRejected("invalid message: wrong unmasking request length")
        _check_survivors(c, survivors, UNMASKING)
        alive = set(survivors.tolist())
        # For each peer exactly one share: of b_v if v survived, of its mask key if it dropped.
        entries = [(v, d.held[v][: W.SHARE] if v in alive else d.held[v][W.SHARE :]) for v in sorted(d.held)]
        return r.message(UNMASKING, me, W.records(entries)), _Completed


class _Completed(_State):
    phase = -1

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        raise refuse(AbortReason.REQUEST_REFUSED,
                      "this client already answered the unmasking request; a second answer could reveal "
                      "both secrets of a peer", UNMASKING)


class _Aborted(_State):
    phase = -1

    @staticmethod
    def step(c: Client, body: memoryview) -> tuple[bytes, type[_State]]:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "this client left the round and reveals nothing more")


_STATES: tuple[type[_State], ...] = (_AdvertiseKeys, _ShareKeys, _MaskedInput, _Consistency, _Unmasking,
                                     _Completed, _Aborted)


class Client(ClientProtocol):
    """One client of one round; ``timings``: CPU seconds of its steps, all threads of the process (share_keys;
    quantize: checking, or encoding whole, the input; mask: encoding, masking and packing it)."""

    def __init__(self, rnd: Round, me: int, rng: RandomSource, state: type[_State] = _AdvertiseKeys,
                 data: _ClientData | None = None) -> None:
        self.round, self.me, self.rng = rnd, me, rng
        self.state = state
        self.data = data if data is not None else _ClientData()
        self.timings: dict[str, float] = {}

    def set_input(self, x: np.ndarray) -> None:
        """Check `x` now (InvalidInput for a bad shape, NaN/Inf or a value outside the encoder's range).

        A chunked encoder (FixedPoint) encodes `x` while the masked input is made, reading
        it then: do not modify `x` in between. Other encoders encode it now.
        """
        if self.state not in (_AdvertiseKeys, _ShareKeys, _MaskedInput):
            raise InvalidInput("this client already sent its masked input in this round")
        r = self.round
        x = check_vector(x, r.spec.dim)
        t0 = time.process_time()
        if r.encoder.chunked:
            r.encoder.check(x)
            self.data.pending, self.data.encoded = x, None
            self.timings["quantize"] = time.process_time() - t0
            return
        check_finite(x)
        y = r.encoder.encode(x, n=r.spec.n, rng=self.rng)
        self.timings["quantize"] = time.process_time() - t0
        if not isinstance(y, np.ndarray) or y.shape != (r.spec.dim,) or y.dtype != r.dtype:
            raise ConfigurationError(f"encoder returned {getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}, "
                                     f"expected {r.dtype} of shape ({r.spec.dim},)")
        self.data.encoded, self.data.pending = np.ascontiguousarray(y), None

    def source(self) -> Source | None:
        """The encoded input as a chunk source, or None before set_input."""
        r, d = self.round, self.data
        if d.pending is not None:
            key = self.rng.child("secagg/rounding").token_bytes(ROUNDING_KEY_BYTES)
            return encoded_source(d.pending, r.encoder, r.spec.n, key)
        return None if d.encoded is None else stored_source(d.encoded)

    def handle(self, phase: str, request: bytes) -> bytes | None:
        state = self.state
        try:
            if state in (_Completed, _Aborted):
                return state.step(self, memoryview(b""))[0]
            if PHASE_INDEX.get(phase) != state.phase:
                raise MessageRejected(f"invalid message: out of phase ({phase!r}; expected {PHASES[state.phase]!r})")
            body = self.round.body(request, state.phase, wire.SERVER)
            reply, self.state = state.step(self, body)
            return reply
        except (MessageRejected, ProtocolAborted, InvalidInput):
            self.state = _Aborted
            self.data = _ClientData()  # forget every secret: nothing more can be revealed
            raise

    def dump(self) -> bytes:
        return _dump_client(self)


_DUMP_MAGIC = b"SFSC"
_DUMP_VERSION = 1


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u(self, fmt: str, *v: int) -> None:
        self.parts.append(struct.pack(">" + fmt, *v))

    def blob(self, b: bytes) -> None:
        self.u("Q", len(b))
        self.parts.append(bytes(b))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.mv, self.off = memoryview(data), 0

    def u(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(">" + fmt)
        if self.off + s.size > len(self.mv):
            raise MessageRejected("invalid client state: truncated")
        v = s.unpack_from(self.mv, self.off)
        self.off += s.size
        return v

    def raw(self, n: int) -> bytes:
        if self.off + n > len(self.mv):
            raise MessageRejected("invalid client state: truncated")
        self.off += n
        return bytes(self.mv[self.off - n : self.off])

    def blob(self) -> bytes:
        return self.raw(self.u("Q")[0])


def _dump_client(c: Client) -> bytes:
    r, d, s = c.round, c.data, c.round.spec
    w = _Writer()
    w.parts.append(_DUMP_MAGIC + r.tag)
    w.u("BB", _DUMP_VERSION, _STATES.index(c.state))
    w.u("IQI", s.n, s.dim, s.round_index)
    w.parts.append(s.session_id)
    w.u("IIIBB", c.me, r.t, r.params.degree, r.width, int(r.active))
    for secret in (d.c_sk, d.s_sk, d.b, d.signed):
        w.blob(secret)
    encoded = d.encoded
    if d.pending is not None:  # saved encoded, exactly as the masked-input step would encode it
        encoded = materialize(c.source(), s.dim, r.dtype)  # type: ignore[arg-type]
    w.blob(b"" if encoded is None else encoded.astype(encoded.dtype.newbyteorder("<")).tobytes())
    w.u("I", len(d.peers))
    for v in sorted(d.peers):
        w.u("I", v)
        w.parts.append(d.peers[v][0] + d.peers[v][1])
    w.u("I", len(d.held))
    for v in sorted(d.held):
        w.u("I", v)
        w.parts.append(d.held[v])
    return b"".join(w.parts)


def load_client_state(
    data: bytes, rng: RandomSource, *, tag: bytes, name: str, round_for: Callable[[RoundSpec], Round]
) -> Client:
    """Restore a client saved by :meth:`Client.dump` for the protocol with `tag`; `round_for` gives its rounds."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageRejected("invalid client state: not bytes")
    rd = _Reader(bytes(data))
    if rd.raw(8) != _DUMP_MAGIC + tag:
        raise MessageRejected(f"invalid client state: not a {name} client")
    version, state = rd.u("BB")
    if version != _DUMP_VERSION or state >= len(_STATES):
        raise MessageRejected("invalid client state: unknown version or state")
    n, dim, round_index = rd.u("IQI")
    try:
        spec = RoundSpec(n=n, dim=dim, session_id=rd.raw(32), round_index=round_index)
    except (InvalidInput, ConfigurationError):
        raise MessageRejected("invalid client state: bad round") from None
    me, t, degree, width, active = rd.u("IIIBB")
    r = round_for(spec)
    if (t, degree, width, bool(active)) != (r.t, r.params.degree, r.width, r.active) or not 0 <= me < n:
        raise ConfigurationError("the saved client state was made with other parameters than this protocol's")
    d = _ClientData()
    d.c_sk, d.s_sk, d.b, d.signed = rd.blob(), rd.blob(), rd.blob(), rd.blob()
    enc = rd.blob()
    if enc:
        if len(enc) != dim * r.dtype.itemsize:
            raise MessageRejected("invalid client state: wrong input length")
        d.encoded = np.frombuffer(enc, dtype=r.dtype.newbyteorder("<")).astype(r.dtype)
    for _ in range(rd.u("I")[0]):
        (v,) = rd.u("I")
        keys = rd.raw(W.KEY + 16)
        d.peers[v] = (keys[: W.KEY], keys[W.KEY :])
    for _ in range(rd.u("I")[0]):
        (v,) = rd.u("I")
        d.held[v] = rd.raw(2 * W.SHARE)
    if rd.off != len(rd.mv):
        raise MessageRejected("invalid client state: trailing bytes")
    return Client(r, me, rng, _STATES[state], d)
