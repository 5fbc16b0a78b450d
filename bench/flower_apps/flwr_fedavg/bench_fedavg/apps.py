"""Plain Flower FedAvg rounds (DefaultWorkflow with Flower's FedAvg, no secure aggregation) on d-dimensional
updates: the baseline a secure round is compared with (bench/flower.py).

As in the securefed app, each ClientApp appends one JSON line per message (when its process
started, when the handler started and ended, the process's CPU seconds by then), so that a
message's seconds split the same way: queueing and polling, ClientApp start, the handler, and the
way back (up to the end of Flower's send_and_receive, which polls for replies every 3 s).
"""

import json
import os
import resource
import time

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from securefed.flower.testing import CountingGrid


def update(partition: int, dim: int) -> np.ndarray:
    """The same updates as the securefed run."""
    return np.random.default_rng(partition).uniform(-0.5, 0.5, dim).astype(np.float32)


def _process_start() -> float:
    """Wall-clock time this process started (Linux /proc; 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class _TimedGrid(CountingGrid):
    """Counts bytes and records when each send_and_receive (one round's fit) started and returned."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.calls: list[tuple[float, float]] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        start = time.time()
        out = list(super().send_and_receive(messages, timeout=timeout))
        self.calls.append((start, time.time()))
        return out


def _breakdown(calls: list[tuple[float, float]], lines: list[dict]) -> dict:
    """Mean seconds per message over the rounds: queue_poll, clientapp_start, ours (the handler), back."""
    rows = [[line["proc"] - t0, line["start"] - line["proc"], line["end"] - line["start"], t1 - line["end"],
             line["cpu"]] for t0, t1 in calls for line in lines if t0 <= line["start"] <= t1]
    if not rows:
        return {}
    mean = np.mean(rows, axis=0)
    return {**{k: round(float(v), 3) for k, v in zip(("queue_poll", "clientapp_start", "ours", "back",
                                                       "clientapp_cpu_seconds"), mean)}, "messages": len(rows)}


class _Timed(FedAvg):
    """FedAvg that records when each round's fit starts and ends (configure_fit to aggregate_fit)."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.starts: dict[int, float] = {}
        self.ends: dict[int, float] = {}

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        self.starts[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        out = super().aggregate_fit(server_round, results, failures)
        self.ends[server_round] = time.perf_counter()
        return out


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, dim, rounds = int(cfg["num-nodes"]), int(cfg["dim"]), int(cfg["rounds"])
    strategy = _Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds, round_timeout=float(cfg["timeout"])),
                           strategy=strategy)
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.5)
    counting = _TimedGrid(grid)
    DefaultWorkflow()(counting, legacy)
    nodes = sorted(counting.up)
    node_file = str(cfg["out"]) + ".nodes.jsonl"
    lines = []
    if os.path.exists(node_file):
        with open(node_file) as f:
            lines = [json.loads(s) for s in f]
    result = {
        "round_seconds": [strategy.ends[r] - strategy.starts[r] for r in sorted(strategy.ends)],
        "upload_bytes_per_node": float(np.mean([counting.up[v] for v in nodes])) / rounds,
        "download_bytes_per_node": float(np.mean([counting.down[v] for v in nodes])) / rounds,
        "nodes": len(nodes),
        "breakdown": _breakdown(counting.calls, lines),
    }
    with open(str(cfg["out"]), "w") as f:
        json.dump(result, f)


class _Client(NumPyClient):
    def __init__(self, partition: int, dim: int) -> None:
        self.partition, self.dim = partition, dim

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        return [parameters[0] + update(self.partition, self.dim)], 1, {}


def _client_fn(context: Context):  # type: ignore[no-untyped-def]
    return _Client(int(context.node_config["partition-id"]), int(context.run_config["dim"])).to_client()


def _timed(msg, context, call_next):  # type: ignore[no-untyped-def]
    start = time.time()
    reply = call_next(msg, context)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line = {"proc": _process_start(), "start": start, "end": time.time(), "cpu": usage.ru_utime + usage.ru_stime}
    with open(str(context.run_config["out"]) + ".nodes.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return reply


client = ClientApp(client_fn=_client_fn, mods=[_timed])
