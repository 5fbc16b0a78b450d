"""The ServerApp: securefed's FedAvg strategy over the grid, with central evaluation, checkpoints and audit log."""

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam

from securefed.flower import SecureFedAvg
from securefed_app import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    test = task.test_set()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = task.model()
        net.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(task.evaluate(net, test))

    privacy = task.privacy(cfg)
    # "fedadam": Flower's own FedAdam steps the model on each round's securely aggregated mean.
    fedadam = str(cfg.get("server-optimizer", "")) == "fedadam"
    strategy = SecureFedAvg(
        protocol=task.protocol(cfg),
        privacy=privacy,
        server_lr=task.SERVER_LR if privacy is not None and not fedadam else 1.0,
        server_optimizer=FedAdam(eta=0.05) if fedadam else None,
        min_train_nodes=int(cfg["min-nodes"]),
        min_available_nodes=int(cfg["min-nodes"]),
        phase_timeout=float(cfg["phase-timeout"]),
        train_timeout=float(cfg["train-timeout"]),
        checkpoint_dir=str(cfg["checkpoint-dir"]) or None,
        audit_log=str(cfg["audit-log"]) or None,
        seed=task.seed(cfg),
        # Federated evaluation (securely aggregated means of the nodes' own loss and accuracy): not with DP,
        # whose budget does not cover exact metric sums.
        evaluate_metrics=None if privacy is not None else task.EVALUATE_METRICS,
        # Active SecAgg variants: nodes attest the run config they trained under; an input under another is dropped.
        run_config=cfg,
    )
    result = strategy.start(
        grid,
        ArrayRecord(task.model().state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({k: cfg[k] for k in ("local-epochs", "batch-size", "lr")}),
        evaluate_fn=evaluate,
    )
    for r in result.rounds:
        acc = r.metrics.get("eval_accuracy")
        eps = "" if r.epsilon is None else f", epsilon {r.epsilon:.3f} at delta {privacy.delta:g}"
        fed = r.metrics.get("federated_accuracy")
        fed = "" if fed is None else f", nodes' accuracy {fed:.4f}"
        print(f"round {r.round}: {len(r.included)} of {len(r.participants)} nodes included, "
              f"dropped {sorted(r.dropped)}, accuracy {acc}{eps}{fed}", flush=True)
