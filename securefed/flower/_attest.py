"""Model consistency in the active SecAgg variants on Flower: every summed input was made from one model and config.

An active server that sends different models or configurations to the nodes of one round (``lr = 0`` to all
but one) makes the other inputs zero and receives one node's input as the sum (the model-inconsistency
attack, Pasquini et al., CCS 2022). Pairwise masking cannot see it: it happens before the input exists. So,
in a round whose protocol signs (active SecAgg, SecAgg+):

- each node signs ``session || D || R`` in its input-phase reply, ``D`` being :func:`digest` of the model
  (``"arrays"``) and configuration (``"config"``) it was sent, ``R`` :func:`run_digest` of its
  ``context.run_config`` (which the SuperLink serves each node, and training functions read), purpose
  :data:`PURPOSE`; the reply's ``attest`` is ``R || signature``;
- the server verifies it against what it sent (and ``R`` against its own run config, when it has it) and
  forwards, with the consistency check's survivor list, the signature of every client on that list (the
  clients whose inputs are in the sum);
- a node signs the survivor list, and so can unmask, only when every one of them signed its own ``D || R``.

An honest node signs one ``D || R`` per session, so an honest node that unmasks was given what every honest
input in the sum was made from. ``protocols/flower.md`` section 1; ``proofs/flower.md`` Lemma F17.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from securefed.crypto import signing
from securefed.crypto.signing import KeyDirectory
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import AggregationProtocol
from securefed.protocols.secagg import wire as W

__all__ = ["PURPOSE", "RECORD", "REPLY", "check_input", "check_survivors", "digest", "directory", "pack",
           "run_digest", "sign", "verify"]

#: The signature's purpose (domain separation from every other signature of the round).
PURPOSE = "securefed/flower/model"
_LABEL = b"securefed/flower/model\x00"
_RUN_LABEL = b"securefed/flower/run\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
#: One forwarded attestation in the record list: client index (uint32) and signature.
RECORD = _U32.size + signing.SIGNATURE_BYTES
#: A node's input-phase ``attest``: ``R`` (32 bytes) and its signature.
REPLY = 32 + signing.SIGNATURE_BYTES


def directory(protocol: AggregationProtocol, n: int) -> KeyDirectory | None:
    """The directory a round of `protocol` over `n` clients attests with (one that signs its survivor lists and
    can read them: active SecAgg, SecAgg+, masked BFV over either), or None (semi-honest variants, Plain, other HE
    modes: their threat model has no active server)."""
    find = getattr(protocol, "round_identities", None)
    if find is None or not hasattr(protocol, "survivor_list") or "consistency_check" not in protocol.phases:
        return None
    found = find(n)
    return found if isinstance(found, KeyDirectory) else None


def _field(h: Any, data: bytes) -> None:
    h.update(_U64.pack(len(data)))
    h.update(data)


def _value(h: Any, value: Any) -> None:
    """A type-tagged, length-prefixed encoding: values of different types or splits never collide."""
    if isinstance(value, bool):
        _field(h, b"b" + (b"1" if value else b"0"))
    elif isinstance(value, int):
        _field(h, b"i" + str(value).encode())
    elif isinstance(value, float):  # its 8 bytes: float.hex gives every NaN one text (a red-team collision)
        _field(h, b"f" + _F64.pack(value))
    elif isinstance(value, str):
        _field(h, b"s" + value.encode())
    elif isinstance(value, bytes):
        _field(h, b"y" + value)
    elif isinstance(value, (list, tuple)):
        _field(h, b"l" + _U64.pack(len(value)))
        for item in value:
            _value(h, item)
    else:
        raise MessageRejected(f"invalid request: a config value of type {type(value).__name__}")


def digest(arrays: ArrayRecord, config: ConfigRecord) -> bytes:
    """SHA-256 of the model's arrays (in record order: name, dtype, shape, storage type, bytes) and of the
    config's entries (sorted by key, type-tagged)."""
    h = hashlib.sha256(_LABEL)
    h.update(_U64.pack(len(arrays)))
    for name, array in arrays.items():
        _field(h, name.encode())
        _field(h, str(array.dtype).encode())
        _field(h, ",".join(str(int(x)) for x in array.shape).encode())
        _field(h, str(array.stype).encode())
        _field(h, bytes(array.data))
    _entries(h, config)
    return h.digest()


def run_digest(run_config: Mapping[str, Any]) -> bytes:
    """SHA-256 of a run configuration's entries (sorted by key, type-tagged)."""
    h = hashlib.sha256(_RUN_LABEL)
    _entries(h, run_config)
    return h.digest()


def _entries(h: Any, mapping: Mapping[str, Any]) -> None:
    h.update(_U64.pack(len(mapping)))
    for key in sorted(mapping.keys()):
        _field(h, key.encode())
        _value(h, mapping[key])


def sign(identities: KeyDirectory, client: int, session: bytes, model: bytes) -> bytes:
    """Client `client`'s attestation that in `session` it made its input from what `model` (``D || R``) names."""
    return signing.sign(identities.signing_key(client), session + model, purpose=PURPOSE)


def check_input(identities: KeyDirectory, client: int, session: bytes, model: bytes, attest: bytes,
                run: bytes | None) -> bytes:
    """The signature in client `client`'s input-phase `attest` (``R || signature``), checked against the model
    digest `model` the server sent and, given, its run digest `run`; MessageRejected otherwise."""
    if len(attest) != REPLY:
        raise MessageRejected("invalid reply: no model attestation with the input")
    claimed, signature = attest[:32], attest[32:]
    if run is not None and claimed != run:
        raise MessageRejected("invalid reply: an input made under another run configuration")
    verify(identities, client, session, model + claimed, signature)
    return signature


def verify(identities: KeyDirectory, client: int, session: bytes, model: bytes, signature: bytes) -> None:
    """MessageRejected unless `signature` is client `client`'s attestation of `model` in `session`."""
    signing.verify(identities.verify_key(client), signature, session + model, purpose=PURPOSE)


def pack(signatures: Mapping[int, bytes]) -> bytes:
    """The forwarded attestations: a record list (the protocol's: count, then ``client || signature``, clients
    ascending)."""
    return W.records(sorted(signatures.items()))


def check_survivors(identities: KeyDirectory, session: bytes, model: bytes, survivors: np.ndarray, field: bytes
                    ) -> None:
    """Before a node signs the survivor list `survivors` (of the protocol's consistency_check request): `field`
    must hold an attestation of this node's `model` (``D || R``) by every client on the list, and by no other.

    Raises ProtocolAborted (consistency_check_failed) when a listed client's input was made from another model
    or configuration, or when one is missing; MessageRejected for a malformed field."""
    clients, signatures = W.parse_records(memoryview(field), signing.SIGNATURE_BYTES)  # ids strictly ascending
    if not np.array_equal(clients, survivors):
        raise ProtocolAborted(AbortReason.CONSISTENCY_CHECK_FAILED,
                              "the survivor list and the model attestations name different clients: refusing to "
                              "sign a list whose inputs may come from another model or configuration")
    for client, signature in zip(clients.tolist(), signatures):
        try:
            verify(identities, client, session, model, signature.tobytes())
        except MessageRejected:
            raise ProtocolAborted(
                AbortReason.CONSISTENCY_CHECK_FAILED,
                f"client {client} did not attest the model and configuration this node was sent: the server sent "
                "different ones to different nodes (a model-inconsistency attack), so this node reveals nothing "
                "more in this round") from None
