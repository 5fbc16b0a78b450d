"""Command line: ``securefed demo`` (and ``python -m securefed``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from securefed.errors import SecureFedError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from securefed.demo import run_demo

    console = Console()

    def line(r: object) -> None:
        m = r.metrics  # type: ignore[attr-defined]
        eps = "" if r.epsilon is None else f"  eps {r.epsilon:.3f}"  # type: ignore[attr-defined]
        console.print(
            f"round {r.round:3d}/{args.rounds}  loss {r.loss:.4f}  acc {m['eval_accuracy']:.4f}  "  # type: ignore[attr-defined]
            f"included {len(r.included)}  upload {m['upload_bytes_per_client'] / 1024:.1f} KiB/client{eps}"  # type: ignore[attr-defined]
        )

    res = run_demo(rounds=args.rounds, protocol=args.protocol, dp=not args.no_dp, seed=args.seed,
                   progress=not args.no_progress, on_round=line)
    console.print(f"\n[bold]securefed demo[/bold]: digits, 10 participants (Dirichlet 0.5), {res.rounds} rounds")
    console.print(f"  protocol            {res.protocol}")
    console.print(f"  test accuracy       {res.accuracy:.4f}")
    console.print(f"  upload per client   {res.upload_bytes_per_client / 1024:.1f} KiB per round")
    console.print("  privacy             " + ("no DP" if res.epsilon is None else f"epsilon {res.epsilon:.3f}"))
    console.print(f"  time                {res.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``securefed`` command."""
    from securefed.demo import PROTOCOLS

    parser = argparse.ArgumentParser(prog="securefed", description="Federated training where the server learns only the aggregate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="federated training demo on bundled data")
    demo.add_argument("--rounds", type=int, default=20, help="training rounds (default 20)")
    demo.add_argument("--protocol", choices=PROTOCOLS, default="plain", help="aggregation protocol")
    demo.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    demo.add_argument("--seed", type=int, default=0, help="seed for a reproducible run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SecureFedError as e:
        print(f"securefed: error: {e}", file=sys.stderr)
        return 2
