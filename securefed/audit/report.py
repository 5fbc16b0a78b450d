"""A self-contained HTML report of an audit log: verdict, run summary, plots, a table per round.

Plots are matplotlib PNGs (Agg canvas, no global pyplot state) embedded as data URIs,
so the one file can be attached to an audit record. See ``protocols/audit.md``
section "Report".
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from securefed.audit.keys import PublicKeyLike
from securefed.audit.log import conforms, read_entries
from securefed.audit.verifier import VerificationResult, verify_data
from securefed.errors import InvalidInput, SecureFedError

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code{font-size:.9em;word-break:break-all}
.ok{background:#e3f6e3;border:2px solid #2a8a2a;padding:.8em}.bad{background:#fbe4e4;border:2px solid #b22;padding:.8em}
.plots img{max-width:100%;display:block;margin:.5em 0}details{margin:.3em 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, row_ids: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rid = f' id="{_e(row_ids[i])}"' if row_ids else ""
        body.append(f"<tr{rid}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png(draw: Callable[[Any], None], title: str) -> str:
    """Draw on a fresh Agg figure; the PNG as base64."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(rounds: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(title, base64 PNG)`` for each plot the log has data for."""
    xs = [b["round"] for b in rounds]
    out = []
    eps = [(b["round"], b["dp"]["epsilon"]) for b in rounds if b.get("dp")]
    if eps:
        def draw_eps(ax: Any) -> None:
            ax.plot([r for r, _ in eps], [e for _, e in eps], marker="o", ms=3, color="#b22")
            ax.set_xlabel("round")
            ax.set_ylabel("epsilon (cumulative)")
        out.append(("Privacy spent", _png(draw_eps, "Privacy spent (epsilon, cumulative)")))

    def draw_parts(ax: Any) -> None:
        inc = [len(b.get("included", ())) for b in rounds]
        drop = [len(b["participants"]) - len(b.get("included", ())) for b in rounds]
        ax.bar(xs, inc, color="#2a6ab2", label="included")
        ax.bar(xs, drop, bottom=inc, color="#e08a2a", label="dropped or aborted")
        ax.set_xlabel("round")
        ax.set_ylabel("participants")
        ax.legend(loc="lower right")
    out.append(("Participants and dropouts", _png(draw_parts, "Participants and dropouts per round")))
    series = {k: [(b["round"], b["metrics"][k]) for b in rounds if b.get("metrics", {}).get(k) is not None]
              for k in ("loss", "eval_loss", "eval_accuracy")}
    if any(series.values()):
        def draw_metrics(ax: Any) -> None:
            for k, style in (("loss", "-o"), ("eval_loss", "-s")):
                if series[k]:
                    ax.plot(*zip(*series[k]), style, ms=3, label=k)
            ax.set_xlabel("round")
            ax.set_ylabel("loss")
            handles = list(ax.get_lines())
            if series["eval_accuracy"]:
                acc = ax.twinx()
                handles += acc.plot(*zip(*series["eval_accuracy"]), "-^", ms=3, color="#2a8a2a", label="eval_accuracy")
                acc.set_ylabel("accuracy")
            ax.legend(handles=handles, loc="center right")
        out.append(("Loss and accuracy", _png(draw_metrics, "Loss and accuracy per round")))
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return _e(f"{x:.{digits}g}")
    return _e(x)


def _round_detail(entry: dict[str, Any]) -> str:
    b = entry["body"]
    desc = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
                   for k, v in sorted(b.get("protocol", {}).items()))  # a skipped round ran no protocol
    parts = [f"<table>{desc}</table>" if desc else "", f"<p>participants: {_e(b['participants'])}</p>"]
    if entry["type"] == "round_skipped":
        parts.append(f"<p>skipped, nothing sent, released or spent: {_e(b['reason'])} &mdash; {_e(b['message'])}</p>")
    elif entry["type"] == "round_aborted":
        parts.append(f"<p>aborted in phase {_e(b['phase'])}: {_e(b['reason'])} &mdash; {_e(b['message'])}</p>")
    else:
        senders = {ph: sorted({m['party'] for m in b["received"] if m["phase"] == ph}, key=str) for ph in b["phases"]}
        parts.append(_table(["phase", "senders"], [[_e(ph), _e(senders[ph])] for ph in b["phases"]]))
        if b["dropped"]:
            parts.append(_table(["participant", "phase", "reason", "detail"],
                                [[_e(d["participant"]), _e(d["phase"]), _e(d["reason"]), _e(d["detail"])]
                                 for d in b["dropped"]]))
        parts.append(f"<p>aggregate: <code>{_e(b['aggregate']['sha256'])}</code> ({b['aggregate']['dim']} float64)</p>")
        parts.append(_table(["party", "phase", "sha256", "bytes"],
                            [[_e(m["party"]), _e(m["phase"]), f"<code>{_e(m['sha256'])}</code>", _e(m["size"])]
                             for m in b["received"]]))
    if b.get("dp"):
        parts.append(f"<p>DP events: <code>{_e(b['dp']['events'])}</code></p>")
    return (f'<details id="round-{b["round"]}-detail"><summary>round {b["round"]} '
            f'({_e(entry["type"])}, entry {entry["seq"]})</summary>{"".join(parts)}</details>')


def _unamplified(res: VerificationResult) -> str:
    """With Poisson-sampled events (q < 1): the ledger's epsilon with every rate taken as 1, what holds
    against whoever knows the samples (protocols/dp.md section 1); else nothing."""
    rates = [e.get("sampling_rate", 1.0) for e in res.ledger]
    if res.epsilon is None or not res.privacy or not any(isinstance(q, float | int) and q < 1.0 for q in rates):
        return ""
    from securefed.privacy.accountant import Accountant

    try:
        acc = Accountant.from_ledger(res.ledger, res.privacy["accountant"],
                                     conversion=res.privacy.get("conversion", "improved"))
        eps = acc.epsilon(float(res.privacy["delta"]), amplified=False)
    except SecureFedError as e:  # a ledger the verifier already failed: say why, render the rest
        return f"; epsilon without amplification by sampling: not computable ({_e(e)})"
    return (f"; epsilon without amplification by sampling {eps:.6g} (every event at q = 1: the guarantee "
            "against whoever knows the samples, e.g. the server that drew them; recomputed)")


def _verdict(res: VerificationResult, pinned: bool) -> str:
    if res.ok:
        key = "pinned by the auditor" if pinned else "taken from entry 1 (not pinned: proves integrity, not authorship)"
        eps = ("no differential privacy" if res.epsilon is None
               else f"epsilon {res.epsilon:.6g} at delta {res.delta:g} ({_e(res.accountant)} accountant), recomputed")
        if res.seeded_secrets:
            eps += (". <b>SEEDED SECRETS</b>: noise, sampling and protocol keys derived from a public seed; "
                    "the epsilon is VOID and the aggregation was not secret (a simulation)")
        return (f'<div class="ok"><b>VERIFIED</b>: schema, hash chain, signatures, round rules, protocol conditions '
                f'and privacy spend all check. {eps}.<br>Public key <code>{_e(res.public_key)}</code>, {key}.<br>'
                f'Head (number and hash of the last entry; pin it next time) <code>{_e(res.pin)}</code>; '
                f'{"complete (ends with run_end)" if res.complete else "INCOMPLETE: no final run_end"}.</div>')
    rows = [[_e(f.entry), f"<code>{_e(f.field)}</code>", _e(f.expected), _e(f.found)] for f in res.failures]
    return (f'<div class="bad"><b>VERIFICATION FAILED</b>: {len(res.failures)} problem(s). '
            f'Nothing below can be relied on.</div>' + _table(["entry", "field", "expected", "found"], rows))


def render_report(
    log: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    pubkey: PublicKeyLike | None = None,
    allow_incomplete: bool = False,
    allow_seeded: bool = False,
) -> VerificationResult:
    """Verify the log at `log` and write an HTML report of it to `output`; returns the verification.

    `allow_incomplete` and `allow_seeded` as for :func:`~securefed.audit.verify`. The
    report is written whether or not the log verifies, and says which. Raises
    InvalidInput when the log cannot be read or the report cannot be written. See
    ``protocols/audit.md`` section "Report".
    """
    try:
        data = Path(log).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read the audit log {os.fspath(log)!r}: {e.strerror or e}") from e
    res = verify_data(data, pubkey, allow_incomplete=allow_incomplete, allow_seeded=allow_seeded)
    entries = read_entries(data)
    # Entries that fail the schema are listed among the failures, not rendered.
    valid = [e for e in entries if conforms(e)]  # the compiled check: no jsonschema needed
    rounds = [e for e in valid if e["type"] in ("round", "round_aborted", "round_skipped")]
    starts = [e for e in valid if e["type"] in ("run_start", "resume", "run_end")]
    first = valid[0]["body"] if valid and valid[0]["type"] == "run_start" else {}
    bodies = [e["body"] for e in rounds]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    out = [(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>securefed audit report: "
            f"{_e(Path(log).name)}</title><style>{_CSS}</style></head><body>"),
           (f"<h1>securefed audit report</h1><p>Log <code>{_e(Path(log).name)}</code>, {len(data)} bytes, "
            f"SHA-256 <code>{hashlib.sha256(data).hexdigest()}</code>; generated {now}.</p>"),
           _verdict(res, pubkey is not None), "<h2>Run summary</h2>"]
    protocols = sorted({str(b["protocol"].get("protocol")) for b in bodies if "protocol" in b})
    summary = [
        ["run id", f"<code>{_e(first.get('run_id'))}</code>"],
        ["protocols", _e(", ".join(protocols) or "none")],
        ["rounds", (f"{res.rounds} completed, {res.aborted} aborted, {res.skipped} skipped "
                    f"(last round {_fmt(res.last_round)})")],
        ["privacy", "none declared" if res.epsilon is None else
         f"{_e(res.accountant)} accountant, delta {res.delta:g}, epsilon {res.epsilon:.6g} (recomputed)"
         + _unamplified(res)],
        ["sessions", "<br>".join(f"entry {e.get('seq')}: {_e(e.get('type'))} at {_e(e.get('time'))}"
                                 + (f" ({_e(e['body'].get('status'))} {_e(e['body'].get('detail', ''))})"
                                    if e.get("type") == "run_end" else "") for e in starts)],
    ]
    out.append(_table(["", ""], summary))
    if first:
        out.append("<h3>Software</h3>" + _table(["package", "version"], [[_e(k), _e(v)] for k, v in
                                                                       sorted(first.get("software", {}).items())]))
        out.append("<h3>Configuration</h3>" + _table(["setting", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in
                                                                          sorted(first.get("config", {}).items())]))
    out.append('<h2>Plots</h2><div class="plots">')
    for title, png in _plots(bodies) if bodies else []:
        out.append(f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{png}"><figcaption>{_e(title)}'
                   f"</figcaption></figure>")
    out.append("</div><h2>Rounds</h2>")
    rows, ids = [], []
    for entry in rounds:
        b = entry["body"]
        d = b.get("protocol", {})
        m = b.get("metrics", {}) or {}
        drops = ", ".join(f"{x['participant']} ({x['phase']}: {x['reason']})" for x in b.get("dropped", []))
        status = {"round": "completed", "round_skipped": f"SKIPPED ({b.get('reason')})"}.get(
            entry["type"], f"ABORTED ({b.get('reason')})")
        mechanisms = ", ".join(
            f"{ev.get('mechanism')} z={ev.get('noise_multiplier')} q={ev.get('sampling_rate')}"
            + (f" clip={ev['l2_clip']}" if "l2_clip" in ev else "") for ev in (b.get("dp") or {}).get("events", []))
        rows.append([_e(b["round"]), _e(status), _fmt(d.get("protocol")), _e(len(b["participants"])),
                     _fmt(d.get("threshold")), _e(len(b.get("included", []))), _e(drops or "none"),
                     _e(mechanisms or "none"), _fmt((b.get("dp") or {}).get("epsilon")), _fmt(m.get("loss")),
                     _fmt(m.get("eval_accuracy")),
                     f'<a href="#round-{b["round"]}-detail">details</a>'])
        ids.append(f"round-{b['round']}")
    out.append(_table(["round", "status", "protocol", "n", "threshold", "included", "dropped (phase: reason)",
                       "DP events (noise multiplier z, sampling rate q)", "epsilon", "loss", "accuracy", ""],
                      rows, row_ids=ids))
    out.append("<h2>Round details</h2>")
    out.extend(_round_detail(e) for e in rounds)
    out.append("</body></html>\n")
    tmp = Path(output).with_name(Path(output).name + ".tmp")
    try:
        tmp.write_text("".join(out), encoding="utf-8")
        os.replace(tmp, output)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write the report {os.fspath(output)!r}: {err.strerror or err}; "
                           "choose a writable path with -o") from err
    return res
