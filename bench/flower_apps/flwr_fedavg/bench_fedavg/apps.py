"""Plain Flower FedAvg rounds (DefaultWorkflow with Flower's FedAvg, no secure aggregation) on d-dimensional
updates: the baseline a secure round is compared with (bench/flower.py)."""

import json
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
    counting = CountingGrid(grid)
    DefaultWorkflow()(counting, legacy)
    nodes = sorted(counting.up)
    result = {
        "round_seconds": [strategy.ends[r] - strategy.starts[r] for r in sorted(strategy.ends)],
        "upload_bytes_per_node": float(np.mean([counting.up[v] for v in nodes])) / rounds,
        "download_bytes_per_node": float(np.mean([counting.down[v] for v in nodes])) / rounds,
        "nodes": len(nodes),
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


client = ClientApp(client_fn=_client_fn)
