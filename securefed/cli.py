"""Command line: ``securefed demo``, ``securefed audit verify|report`` (and ``python -m securefed``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from securefed.errors import SecureFedError

__all__ = ["DEMO_PROTOCOLS", "EXIT_BUG", "EXIT_USAGE", "main"]

#: Exit statuses besides 0 (success) and 1 (an audit log that failed verification): EXIT_USAGE for
#: a usage or input error (argparse's status too), EXIT_BUG for an unexpected error (a bug).
EXIT_USAGE, EXIT_BUG = 2, 3


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**64:  # the trainer derives its keys from the seed's 8 bytes
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _printer() -> Callable[[str, str], None]:
    """``show(bold_head, text)``: through rich on a terminal; plain lines at their natural width otherwise
    (piped output is never wrapped, so no number is split across lines)."""
    if not sys.stdout.isatty():
        return lambda head, text: print(head + text, flush=True)
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    return lambda head, text: console.print(f"[bold]{escape(head)}[/bold]{escape(text)}", soft_wrap=True)


def _demo(args: argparse.Namespace) -> int:
    from securefed.demo import run_demo

    show = _printer()

    def line(r: object) -> None:
        m = r.metrics  # type: ignore[attr-defined]
        eps = "" if r.epsilon is None else f"  eps {r.epsilon:.3f}"  # type: ignore[attr-defined]
        loss = "" if r.loss is None else f"  loss {r.loss:.4f}"  # type: ignore[attr-defined]  # None under DP
        show("", f"round {r.round:3d}/{args.rounds}{loss}  acc {m['eval_accuracy']:.4f}  "  # type: ignore[attr-defined]
                 f"included {len(r.included)}  upload {m['upload_bytes_per_client'] / 1024:.1f} KiB/client{eps}")  # type: ignore[attr-defined]

    # The progress bar is for a terminal: piped, it would add its last frame to the output.
    res = run_demo(rounds=args.rounds, protocol=args.protocol, dp=not args.no_dp, seed=args.seed,
                   progress=not args.no_progress and sys.stdout.isatty(), on_round=line, audit_log=args.audit_log)
    show("", "")
    show("securefed demo", f": digits, 10 participants (Dirichlet 0.5), {res.rounds} rounds")
    show("", f"  protocol            {res.protocol}")
    show("", f"  test accuracy       {res.accuracy:.4f}")
    show("", f"  upload per client   {res.upload_bytes_per_client / 1024:.1f} KiB per round")
    show("", "  privacy             " + ("no DP" if res.epsilon is None else
                                      f"epsilon {res.epsilon:.3f} at delta {res.delta:g} ({res.privacy})"))
    show("", f"  time                {res.seconds:.1f} s")
    if args.audit_log:
        show("", f"  audit log           {args.audit_log}; check it with")
        show("", f"    securefed audit verify {args.audit_log} --pubkey {args.audit_log}.pub")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    import json

    from securefed.audit import verify

    res = verify(args.log, args.pubkey, allow_incomplete=args.allow_incomplete, head=args.head,
                 allow_seeded=args.allow_seeded, pinned=args.pin or (), min_counter=args.min_counter)
    if args.json:
        print(json.dumps({"ok": res.ok, "failures": [vars(f) for f in res.failures], "entries": res.entries,
                          "rounds": res.rounds, "aborted": res.aborted, "skipped": res.skipped, "epsilon": res.epsilon,
                          "privacy": res.privacy,
                          "public_key": res.public_key, "key_pinned": res.key_pinned, "head": res.head,
                          "head_seq": res.head_seq, "pin": res.pin, "checkpoint_counter": res.checkpoint_counter,
                          "complete": res.complete, "seeded_secrets": res.seeded_secrets,
                          "epsilon_void": res.epsilon_void}))
    else:
        print(res.summary())
        if args.pubkey is None:  # the verdict rests on the key the log itself carries
            print("  note: no --pubkey: the signing key was taken from the log itself and is not pinned, so this "
                  "proves integrity only against the key inside the log; pin LOG.pub received out of band")
    return 0 if res.ok else 1


def _audit_report(args: argparse.Namespace) -> int:
    from securefed.audit.report import render_report

    res = render_report(args.log, args.output, pubkey=args.pubkey, allow_incomplete=args.allow_incomplete,
                        allow_seeded=args.allow_seeded)
    print(f"wrote {args.output}: " + (
        "the log verified" if res.ok
        else f"the log FAILED verification ({len(res.failures)} problems, listed in the report)"))
    return 0 if res.ok else 1


#: ``securefed.demo.PROTOCOLS``, repeated so that parsing does not import torch (a test keeps them equal).
DEMO_PROTOCOLS = ("plain", "secagg", "secagg+", "ckks", "bfv")
_DEBUG_HELP = "on an error, print its traceback too (or set SECUREFED_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``securefed`` command."""
    parser = argparse.ArgumentParser(prog="securefed",
                                     description="Federated training where the server learns only the aggregate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="federated training demo on bundled data")
    demo.add_argument("--rounds", type=_positive, default=20, help="training rounds (default 20)")
    demo.add_argument("--protocol", choices=DEMO_PROTOCOLS, default="secagg+",
                      help="aggregation protocol (default secagg+)")
    demo.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="seed of the data split, model initialisation and local shuffling (default 0); noise, "
                           "sampling and protocol keys always come from the OS")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--audit-log", metavar="PATH", help="write a signed audit log of every round to PATH")
    demo.set_defaults(func=_demo)
    audit = sub.add_parser("audit", help="verify an audit log, or write a report on it")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    pin = "pin the server's audit key: 64 hex digits, or a PEM or hex file (LOG.pub)"
    incomplete = "accept a log without a final run_end (a crashed or running job)"
    seeded = ("accept the log of a simulation whose secrets came from a public seed "
              "(its epsilon is still reported VOID)")
    verify = audit_sub.add_parser("verify", help="check an audit log; exit 0 only if every check passes")
    verify.add_argument("log", help="the audit log (JSON Lines)")
    verify.add_argument("--pubkey", metavar="KEY", help=pin)
    verify.add_argument("--head", metavar="HASH", help="pin the hash of the last entry (detects a cut log)")
    verify.add_argument("--pin", metavar="SEQ:SHA256", action="append",
                        help="a head seen before (as verify prints it): the log must still hold entry SEQ with that "
                             "hash, so a log cut and regrown (a rollback) fails; repeatable")
    verify.add_argument("--min-counter", metavar="N", type=int,
                        help="the last checkpoint counter in the log must be at least N "
                             "(a counter seen outside the log)")
    verify.add_argument("--allow-incomplete", action="store_true", help=incomplete)
    verify.add_argument("--allow-seeded", action="store_true", help=seeded)
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verify.set_defaults(func=_audit_verify)
    report = audit_sub.add_parser("report", help="verify an audit log and write a self-contained HTML report")
    report.add_argument("log", help="the audit log (JSON Lines)")
    report.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    report.add_argument("--pubkey", metavar="KEY", help=pin)
    report.add_argument("--allow-incomplete", action="store_true", help=incomplete)
    report.add_argument("--allow-seeded", action="store_true", help=seeded)
    report.set_defaults(func=_audit_report)
    for leaf in (demo, verify, report):  # --debug after the command too; SUPPRESS keeps the global value
        leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _error(e: BaseException, debug: bool) -> int:
    """Report `e` on stderr: one line (the traceback before it only when debugging); the exit status."""
    if debug:
        traceback.print_exception(e)
    hint = "" if debug else "; rerun with --debug for the traceback"
    if isinstance(e, SecureFedError):
        message, status = str(e), EXIT_USAGE
    elif isinstance(e, OSError):  # the environment: a missing folder, no permission, a full disk
        where = "" if e.filename is None else f": {os.fsdecode(e.filename)}"
        message, status = f"{e.strerror or e}{where}{hint}", EXIT_USAGE
    else:
        text = str(e).strip().splitlines()
        detail = f": {text[0]}" if text else ""
        message, status = f"unexpected {type(e).__name__}{detail} (a bug in securefed{hint})", EXIT_BUG
    print(f"securefed: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0, 1 for a log that failed verification, EXIT_USAGE, EXIT_BUG).

    Errors print one line on stderr; ``--debug`` or ``SECUREFED_DEBUG=1`` prints the traceback too.
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SECUREFED_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except BrokenPipeError:  # the reader went away (securefed demo | head): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # no real stdout (an embedding program)
            pass
        return 1
    except KeyboardInterrupt:
        print("securefed: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends as one line (and a status), never a traceback
        return _error(e, debug)
