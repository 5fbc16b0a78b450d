"""Running securefed's Flower apps without a deployment: an in-process grid (Flower's simulation, minus Ray).

:class:`InProcessGrid` plays the SuperLink and the SuperNodes in one process: each
pushed message is serialized and inflated again as Flower's transport does, handed
to the ``ClientApp`` with that node's ``Context`` (whose ``state`` also goes through
serialization between messages, as between ``flwr-clientapp`` processes), and the
reply waits to be pulled. Hooks make nodes crash or lie, for tests.
For real processes on loopback see :mod:`securefed.flower.loopback`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["CountingGrid", "InProcessGrid", "InconsistentModels", "content_bytes", "roundtrip"]

log = logging.getLogger("securefed.flower.testing")

_SUPERLINK = 1  # Flower's SUPERLINK_NODE_ID
_CLIENT_APP_RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def roundtrip(obj: Any) -> Any:
    """`obj` (a Message or record) deflated to bytes and inflated again, as Flower's transport does."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(obj).items()}
    return inflate_object_from_contents(obj.object_id, contents)


def content_bytes(msg: Message) -> int:
    """Serialized size of a message's content (every record as Flower deflates it); 0 for an error reply."""
    if not msg.has_content():
        return 0
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg.content).values())


class CountingGrid(Grid):
    """Wraps a grid and counts, per node, the serialized content bytes sent to it (``down``) and
    received from it (``up``), for any workflow that uses the grid (securefed's or Flower's own)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def _sent(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for m in out:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + content_bytes(m)
        return out

    def _received(self, replies: Iterable[Message]) -> list[Message]:
        out = list(replies)
        for m in out:
            self.up[m.metadata.src_node_id] = self.up.get(m.metadata.src_node_id, 0) + content_bytes(m)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._sent(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._received(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._received(self.grid.send_and_receive(self._sent(messages), timeout=timeout))


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes run `client_app` in this process.

    - ``nodes``: node id to that node's ``node_config``;
    - ``run_config``: the run configuration every node sees;
    - ``deliver(node, message)``: False keeps the message from the node (it crashed
      or is offline): no reply comes;
    - ``tamper(node, reply)``: what the server receives instead of the reply (None: nothing).

    ``sent`` and ``received`` count messages per node.
    """

    def __init__(
        self,
        client_app: ClientApp,
        nodes: Mapping[int, Mapping[str, Any]],
        *,
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
        deliver: Callable[[int, Message], bool] | None = None,
        tamper: Callable[[int, Message], Message | None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.deliver = deliver
        self.tamper = tamper
        self._run = Run.create_empty(run_id)
        self._states = {int(v): RecordDict() for v in nodes}
        self._node_configs = {int(v): dict(cfg) for v, cfg in nodes.items()}
        self._run_config = dict(run_config or {})
        self._replies: dict[str, Message] = {}
        self.sent = dict.fromkeys(self._states, 0)
        self.received = dict.fromkeys(self._states, 0)
        # Messages created on the server side take their run and node from here (as in a ServerApp process).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, _SUPERLINK

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._states)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=v, status="online") for v in self._states]

    def context(self, node: int) -> Context:
        """The node's context as its next message will see it (state inflated from bytes)."""
        return Context(run_id=self._run.run_id, node_id=node, node_config=dict(self._node_configs[node]),
                       state=roundtrip(self._states[node]), run_config=dict(self._run_config))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            with no_object_id_recompute():
                msg.metadata.__dict__["_message_id"] = msg.object_id
            mid = msg.metadata.message_id
            if node not in self._states:
                ids.append("")
                continue
            ids.append(mid)
            self.sent[node] += 1
            if self.deliver is not None and not self.deliver(node, msg):
                continue
            handled = self._handle(node, msg)
            reply = handled if self.tamper is None else self.tamper(node, handled)
            if reply is not None:
                self.received[node] += 1
                reply = roundtrip(reply)
                reply.metadata.__dict__["_message_id"] = reply.object_id
                self._replies[mid] = reply
        return ids

    def _handle(self, node: int, msg: Message) -> Message:
        incoming = roundtrip(msg)
        incoming.metadata.__dict__["_message_id"] = msg.metadata.message_id
        context = self.context(node)
        try:
            reply = self.client_app(incoming, context)
        except Exception as e:  # noqa: BLE001 - a ClientApp that raises is an error reply in Flower too
            log.info("node %d: ClientApp raised %s: %s", node, type(e).__name__, e)
            return Message(Error(code=_CLIENT_APP_RAISED, reason=f"{type(e)}:<'{e}'>"), reply_to=incoming)
        self._states[node] = roundtrip(context.state)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        out = list(self.pull_messages(ids))
        while deadline is not None and len(out) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.01)
            out.extend(self.pull_messages(ids))
        return out


class InconsistentModels(InProcessGrid):
    """The model-inconsistency attacker (Pasquini et al., CCS 2022) as a grid, for tests: an active server that
    sends the input phase's model and config unchanged to node `victim` and, to every other node, the config
    with the entries of `config` overwritten (``{"lr": 0.0}``), given `arrays` that model instead, and given
    `run_config` those entries in its ``context.run_config`` (which the SuperLink serves each node).

    With every other input zero (or known), the sum is the victim's input. The active SecAgg variants refuse
    such a round at the consistency check (``protocols/flower.md`` section 1); their semi-honest variants, whose
    threat model has no active server, and Plain release the sum. securefed's own server verifies each node's
    attestation against the model it meant to send and drops those made from another: a malicious server skips
    that check, so an attack test switches it off (``tests/flower/test_model_consistency.py``). Other options
    are :class:`InProcessGrid`'s.
    """

    def __init__(self, client_app: ClientApp, nodes: Mapping[int, Mapping[str, Any]], *, victim: int,
                 config: Mapping[str, Any] | None = None, arrays: ArrayRecord | None = None,
                 run_config: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__(client_app, nodes, **options)
        self.victim, self.config, self.arrays = victim, dict(config or {}), arrays
        self.run_config = dict(run_config or {})

    def context(self, node: int) -> Context:
        context = super().context(node)
        if node != self.victim:
            context.run_config = {**context.run_config, **self.run_config}
        return context

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type in ("train", "evaluate") and msg.metadata.dst_node_id != self.victim:
                if "config" in msg.content:  # a new record: the victim's message shares the server's
                    msg.content["config"] = ConfigRecord({**msg.content.config_records["config"], **self.config})
                if self.arrays is not None:
                    msg.content["arrays"] = self.arrays
        return super().push_messages(messages)

