"""The securefed record inside a Flower message: protocol payload bytes plus the round they belong to.

Layout (``protocols/flower.md``, "Envelope"): one ``ConfigRecord`` under the key
``"securefed"``. A request carries ``v, protocol, params, phase, round, n, dim,
session, client, max_examples, payload`` (``max_examples`` > 0: weight the update by
examples, capped there; 0: uniform); a reply carries ``v, phase, round, session, client,
payload``. The input phase's request also carries the global model (``ArrayRecord``
``"arrays"``) and the training configuration (``ConfigRecord`` ``"config"``).

Parsing is strict (exact keys and types); anything else is MessageRejected. The
protocol's own header, inside ``payload``, binds round, session, phase and sender
again, so a forged envelope around a replayed payload is still refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from securefed.errors import MessageRejected
from securefed.protocols.base import AggregationProtocol

__all__ = ["KEY", "VERSION", "Reply", "Request", "describe", "parse_reply", "parse_request"]

#: The record key of securefed's envelope in a Flower ``RecordDict``.
KEY = "securefed"
#: Envelope layout version.
VERSION = 1

_REQUEST_FIELDS = {
    "v": int, "protocol": str, "params": str, "phase": str, "round": int, "n": int, "dim": int,
    "session": bytes, "client": int, "max_examples": int, "payload": bytes,
}
_REPLY_FIELDS = {"v": int, "phase": str, "round": int, "session": bytes, "client": int, "payload": bytes}


def describe(protocol: AggregationProtocol, n: int) -> str:
    """``protocol.describe(n)`` as canonical JSON: what server and client must agree on."""
    return json.dumps(protocol.describe(n), sort_keys=True, separators=(",", ":"), default=str)


@dataclasses.dataclass(frozen=True)
class Request:
    """One protocol request to one client (what the server sends in one phase)."""

    protocol: str
    params: str
    phase: str
    round: int
    n: int
    dim: int
    session: bytes
    client: int
    max_examples: int
    payload: bytes

    def record(self) -> ConfigRecord:
        return ConfigRecord({"v": VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}})


@dataclasses.dataclass(frozen=True)
class Reply:
    """One client's answer to a request."""

    phase: str
    round: int
    session: bytes
    client: int
    payload: bytes

    def record(self) -> ConfigRecord:
        return ConfigRecord({"v": VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}})


def _fields(record: Any, spec: Mapping[str, type], what: str) -> dict[str, Any]:
    if not isinstance(record, ConfigRecord) or set(record.keys()) != set(spec):
        raise MessageRejected(f"invalid {what}: not a securefed {what} record")
    out = {}
    for key, kind in spec.items():
        value = record[key]
        # bool is an int subclass; a bool where an int belongs is malformed.
        if type(value) is not kind:
            raise MessageRejected(f"invalid {what}: field {key!r} has the wrong type")
        out[key] = value
    if out.pop("v") != VERSION:
        raise MessageRejected(f"invalid {what}: unsupported envelope version")
    return out


def parse_request(content: RecordDict, *, input_phase: bool) -> tuple[Request, ArrayRecord | None, ConfigRecord | None]:
    """The envelope of a request and, for the input phase, the model and training config.

    Raises MessageRejected for anything but exactly that layout.
    """
    expected = {KEY, "arrays", "config"} if input_phase else {KEY}
    if set(content.keys()) != expected:
        raise MessageRejected("invalid request: unexpected records")
    req = Request(**_fields(content[KEY], _REQUEST_FIELDS, "request"))
    if len(req.session) != 32 or req.n < 1 or req.dim < 1 or not 0 <= req.client < req.n or not 0 <= req.round < 2**32 \
            or req.max_examples < 0:
        raise MessageRejected("invalid request: field out of range")
    if not input_phase:
        return req, None, None
    arrays, config = content["arrays"], content["config"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
        raise MessageRejected("invalid request: wrong record types")
    return req, arrays, config


def parse_reply(content: RecordDict, *, max_payload: int) -> Reply:
    """The envelope of a reply; MessageRejected for any other layout or a payload over `max_payload` bytes."""
    if set(content.keys()) != {KEY}:
        raise MessageRejected("invalid reply: unexpected records")
    record = content[KEY]
    if isinstance(record, ConfigRecord) and isinstance(record.get("payload"), bytes) and len(record["payload"]) > max_payload:
        raise MessageRejected(f"invalid reply: payload of {len(record['payload'])} bytes exceeds the limit of {max_payload}")
    return Reply(**_fields(record, _REPLY_FIELDS, "reply"))
