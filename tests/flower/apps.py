"""A torch-free Flower app for the runtime tests: node p's "training" adds its fixed vector x_p to the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securefed.crypto.random import RandomSource
from securefed.flower import GridAggregator, SecureClient
from securefed.protocols.base import AggregationProtocol

SHAPES = ((2, 3), (4,))
#: The first node id :func:`nodes` gives.
FIRST = 1001


def model(value: float = 0.0) -> ArrayRecord:
    """Two float32 arrays and one int64 array (which the runtime must leave alone)."""
    record = ArrayRecord()
    for name, shape in zip(("w", "b"), SHAPES):
        record[name] = Array(np.full(shape, value, np.float32))
    record["steps"] = Array(np.array([7], np.int64))
    return record


def dim() -> int:
    return sum(int(np.prod(s)) for s in SHAPES)


def aggregator(protocol: AggregationProtocol, **options: Any) -> GridAggregator:
    """A GridAggregator for in-process grids: every reply is ready at the first pull, so short
    timeouts only cut the wait for silent nodes."""
    return GridAggregator(protocol, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01, **options)


def run(agg: GridAggregator, grid: Any, members: Sequence[int], *, round_index: int = 1, seed: int = 0) -> Any:
    """One round of `agg` on `grid` with `members`, starting from :func:`model`."""
    return agg.run(grid, list(members), round_index=round_index, dim=dim(), rng=RandomSource(seed),
                   arrays=model(), config=ConfigRecord({"server-round": round_index}))


def vector(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[k].numpy().ravel().astype(np.float64) for k in ("w", "b")])


def client_app(
    protocol: AggregationProtocol | Callable[[Context], AggregationProtocol],
    updates: Mapping[int, Sequence[float]] | Callable[[int, int], np.ndarray],
    *,
    examples: Mapping[int, int] | None = None,
    seed: int | None = 1,
    phases: Sequence[str] | None = None,
    fail: Callable[[int, int], bool] | None = None,
    privacy: Any = None,
    evaluate: Callable[[int, np.ndarray], Mapping[str, float]] | None = None,
    **client: Any,
) -> ClientApp:
    """A ClientApp whose node with ``partition-id`` p moves the model by ``updates(p, round)``.

    ``examples[p]`` is reported as num-examples (default 10); ``fail(p, round)`` makes
    training raise; ``evaluate(p, model vector)``: node p's metrics in a federated evaluation round
    (with num-examples ``examples[p]``); `client` goes to :class:`SecureClient` (``auxiliary=``,
    ``identities=``).
    """
    app = ClientApp()

    def train(msg: Message, context: Context) -> Message:
        p = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        if fail is not None and fail(p, rnd):
            raise RuntimeError(f"node {p} fails in round {rnd}")
        arrays = msg.content["arrays"]
        delta = updates(p, rnd) if callable(updates) else np.asarray(updates[p], np.float64)
        # as in Flower's templates: lr from the message's config, local epochs from the run config
        delta = delta * float(msg.content["config"].get("lr", 1.0)) * int(context.run_config.get("local-epochs", 1))
        new = vector(arrays) + delta
        out = ArrayRecord()
        off = 0
        for name, shape in zip(("w", "b"), SHAPES):
            size = int(np.prod(shape))
            out[name] = Array(new[off : off + size].reshape(shape).astype(np.float32))
            off += size
        out["steps"] = arrays["steps"]
        n = 10 if examples is None else examples[p]
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

    def on_evaluate(msg: Message, context: Context) -> Message:
        assert evaluate is not None
        p = int(context.node_config["partition-id"])
        metrics = {**evaluate(p, vector(msg.content["arrays"])),
                   "num-examples": 10 if examples is None else examples[p]}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    SecureClient(protocol, phases=phases, seed=seed, privacy=privacy, **client).register(
        app, train, None if evaluate is None else on_evaluate)
    return app


def nodes(n: int, first: int = FIRST) -> dict[int, dict[str, Any]]:
    """Node id -> node_config for n nodes with partition ids 0..n-1."""
    return {first + p: {"partition-id": p, "num-partitions": n} for p in range(n)}
