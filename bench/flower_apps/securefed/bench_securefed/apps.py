"""One securefed SecAgg+ round over Flower on d-dimensional updates (bench/flower.py)."""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.flower import GridAggregator, SecureClient
from securefed.flower.testing import CountingGrid


def update(partition: int, dim: int) -> np.ndarray:
    """Node `partition`'s update: uniform in [-0.5, 0.5] (benchmark data, not secret)."""
    return np.random.default_rng(partition).uniform(-0.5, 0.5, dim).astype(np.float32)


def protocol(config) -> sf.protocols.SecAggPlus:  # type: ignore[no-untyped-def]
    return sf.protocols.SecAggPlus(degree=int(config["degree"]))


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, dim = int(cfg["num-nodes"]), int(cfg["dim"])
    while len(nodes := sorted(grid.get_node_ids())) < n:
        time.sleep(0.5)
    counting = CountingGrid(grid)
    proto = protocol(cfg)
    agg = GridAggregator(proto, phase_timeout=float(cfg["timeout"]), train_timeout=float(cfg["timeout"]))
    arrays = ArrayRecord([np.zeros(dim, np.float32)])
    t0 = time.perf_counter()
    out = agg.run(counting, nodes[:n], round_index=1, dim=dim, rng=RandomSource(), arrays=arrays,
                  config=ConfigRecord({}))
    seconds = time.perf_counter() - t0
    # Which node holds which partition is private to the nodes: compare the sum, order-free.
    expected = sum(update(p, dim).astype(np.float64) for p in range(n))
    result = {
        "round_seconds": seconds,
        "phase_seconds": out.phase_seconds,
        "upload_bytes_per_node": float(np.mean([counting.up[v] for v in out.nodes])),
        "download_bytes_per_node": float(np.mean([counting.down[v] for v in out.nodes])),
        "protocol_upload_bytes_per_node": float(np.mean(list(out.bytes_from.values()))),
        "included": len(out.included_nodes),
        "max_abs_error": float(np.max(np.abs(out.result.total - expected))),
        "error_bound": proto.error_bound(n),
        "protocol": proto.describe(n),
    }
    with open(str(cfg["out"]), "w") as f:
        json.dump(result, f)


client = ClientApp()


def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    p = int(context.node_config["partition-id"])
    new = ArrayRecord([arrays["0"].numpy() + update(p, int(context.run_config["dim"]))])
    return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


# The node's protocol is its own: from its node_config (--node-config "... degree=4"), not the server's run config.
SecureClient(lambda context: protocol(context.node_config), phases=sf.protocols.SecAggPlus.phases).register(
    client, train)
