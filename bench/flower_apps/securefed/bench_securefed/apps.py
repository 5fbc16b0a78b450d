"""securefed SecAgg+ rounds over Flower on d-dimensional updates (bench/flower.py).

Runs ``rounds`` rounds on the same nodes; with ``ahead`` = 1 each round also carries the next
round's setup (``GridAggregator.run(..., next_nodes=...)``). The ClientApp appends one JSON line
per message to ``<out>.nodes.jsonl`` (when its process started, when the handler started and
ended) so that the server can split a phase's seconds into queueing and polling, ClientApp
start, our own work and the way back.
"""

import json
import os
import resource
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.flower import GridAggregator, SecureClient
from securefed.flower.testing import CountingGrid, roundtrip


def update(partition: int, dim: int) -> np.ndarray:
    """Node `partition`'s update: uniform in [-0.5, 0.5] (benchmark data, not secret)."""
    return np.random.default_rng(partition).uniform(-0.5, 0.5, dim).astype(np.float32)


def protocol(config) -> sf.protocols.SecAggPlus:  # type: ignore[no-untyped-def]
    """SecAgg+ of `config`'s degree; with an ``identities`` file, active (no dropouts budgeted: small tests)."""
    if config.get("identities"):
        return sf.protocols.SecAggPlus(degree=int(config["degree"]), adversary="active", dropout_fraction=0.0)
    return sf.protocols.SecAggPlus(degree=int(config["degree"]))


def identities(path: str, node: int | None = None) -> KeyDirectory:
    """The federation's identity keys by node id from a JSON file ``{node: [public hex, private hex]}`` (a test
    set-up: a deployment hands each node its own signing key only); with `node`, that node's signing key."""
    with open(path) as f:
        table = {int(k): v for k, v in json.load(f).items()}
    private = {} if node is None else {node: Ed25519PrivateKey.from_private_bytes(bytes.fromhex(table[node][1]))}
    return KeyDirectory({v: bytes.fromhex(pub) for v, (pub, _) in table.items()}, private)


def _process_start() -> float:
    """Wall-clock time this process started (Linux /proc; 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class _TimedGrid(CountingGrid):
    """Counts bytes and records, per pushed message, when it was pushed and when its reply was pulled."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.pushed: dict[str, tuple[float, str, int]] = {}
        self.pulled: dict[str, float] = {}
        self.serialize_seconds: dict[str, float] = {}

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for m in messages[:1]:  # what one message of this type costs to deflate and inflate (transport does both)
            t = time.perf_counter()
            roundtrip(m.content)
            self.serialize_seconds.setdefault(m.metadata.message_type, time.perf_counter() - t)
        now = time.time()
        ids = list(super().push_messages(messages))
        for mid, m in zip(ids, messages):
            if mid:
                self.pushed[mid] = (now, m.metadata.message_type, m.metadata.dst_node_id)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        out = list(super().pull_messages(message_ids))
        now = time.time()
        for r in out:
            self.pulled.setdefault(r.metadata.reply_to_message_id, now)
        return out


def _breakdown(grid: _TimedGrid, node_lines: list[dict]) -> dict:
    """Mean seconds per message type: queueing/polling (push to ClientApp process start), ClientApp start
    (process start to our handler), ours (the handler), back (handler end to the reply pulled)."""
    by_id = {line["reply_to"]: line for line in node_lines}
    parts: dict[str, list[list[float]]] = {}
    for mid, (pushed, kind, _node) in grid.pushed.items():
        line, pulled = by_id.get(mid), grid.pulled.get(mid)
        if line is None or pulled is None:
            continue
        parts.setdefault(kind, []).append([line["proc"] - pushed, line["start"] - line["proc"],
                                           line["end"] - line["start"], pulled - line["end"], line["cpu"]])
    return {kind: {**dict(zip(("queue_poll", "clientapp_start", "ours", "back", "clientapp_cpu_seconds"),
                              (round(float(x), 3) for x in np.mean(rows, axis=0)))),
                   "serialize_roundtrip": round(grid.serialize_seconds.get(kind, 0.0), 3), "messages": len(rows)}
            for kind, rows in parts.items()}


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, dim, rounds, ahead = int(cfg["num-nodes"]), int(cfg["dim"]), int(cfg["rounds"]), bool(int(cfg["ahead"]))
    while len(nodes := sorted(grid.get_node_ids())) < n:
        time.sleep(0.5)
    nodes = nodes[:n]
    timed = _TimedGrid(grid)
    proto = protocol(cfg)
    keys = {"identities": identities(str(cfg["identities"])), "run_config": cfg} if cfg.get("identities") else {}
    agg = GridAggregator(proto, phase_timeout=float(cfg["timeout"]), train_timeout=float(cfg["timeout"]), **keys)
    arrays = ArrayRecord([np.zeros(dim, np.float32)])
    seconds, phases, outs, messages = [], [], [], []
    for r in range(1, rounds + 1):
        # Every round carries the next one's setup, the last too: each round after the first is a steady one.
        extra = {"next_nodes": nodes} if ahead else {}
        pushed = len(timed.pushed)
        t0 = time.perf_counter()
        out = agg.run(timed, nodes, round_index=r, dim=dim, rng=RandomSource(), arrays=arrays,
                      config=ConfigRecord({}), **extra)
        seconds.append(time.perf_counter() - t0)
        messages.append((len(timed.pushed) - pushed) / n)  # Flower messages per node during this round
        phases.append({k: round(v, 3) for k, v in out.phase_seconds.items()})
        outs.append(out)
    node_file = str(cfg["out"]) + ".nodes.jsonl"
    lines = []
    if os.path.exists(node_file):
        with open(node_file) as f:
            lines = [json.loads(s) for s in f]
    # Which node holds which partition is private to the nodes: compare the sum, order-free.
    expected = sum(update(p, dim).astype(np.float64) for p in range(n))
    last = outs[-1]
    result = {
        "round_seconds": seconds,
        "phase_seconds": phases,
        "messages_per_node": {str(v): sum(1 for (_, _, d) in timed.pushed.values() if d == v) for v in nodes},
        "messages_per_round": messages,
        "breakdown": _breakdown(timed, lines),
        "upload_bytes_per_node": float(np.mean([timed.up[v] for v in nodes])) / rounds,
        "download_bytes_per_node": float(np.mean([timed.down[v] for v in nodes])) / rounds,
        "protocol_upload_bytes_per_node": float(np.mean(list(last.bytes_from.values()))),
        "included": len(last.included_nodes),
        "max_abs_error": max(float(np.max(np.abs(o.result.total - expected))) for o in outs),
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
_secure = SecureClient(lambda context: protocol(context.node_config), phases=sf.protocols.SecAggPlus.phases,
                       identities=lambda context: identities(str(context.node_config["identities"]), context.node_id)
                       if context.node_config.get("identities") else None)


def _timed(handler):  # type: ignore[no-untyped-def]
    def wrapped(msg: Message, context: Context) -> Message:
        start = time.time()
        reply = handler(msg, context)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the process's CPU seconds by the handler's end
        line = {"reply_to": msg.metadata.message_id, "type": msg.metadata.message_type, "proc": _process_start(),
                "start": start, "end": time.time(), "cpu": usage.ru_utime + usage.ru_stime}
        with open(str(context.run_config["out"]) + ".nodes.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return reply
    return wrapped


@client.train()
def _train(msg: Message, context: Context) -> Message:
    return _timed(lambda m, c: _secure.handle(m, c, train))(msg, context)


for _phase in sf.protocols.SecAggPlus.phases:
    client.query(_phase)(_timed(lambda m, c: _secure.handle(m, c, None)))
