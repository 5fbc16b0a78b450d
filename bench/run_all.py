"""Run every benchmark of the project; write bench/results.json, bench/scale.png and bench/results.md.

Each ``bench/NAME.py`` (every file here but this one) runs in its own process, one after the
other, and prints one JSON line per configuration; those lines are collected with the
machine they came from into ``results.json``. From ``scale.py``'s lines this draws
``scale.png`` (round time and peak memory against d for Plain, SecAgg+, CKKS and BFV) and
writes ``results.md`` (the table for the README, the acceptance figures and the machine).

    python bench/run_all.py                 # everything (about 25 minutes on 2 cores)
    python bench/run_all.py --only scale    # some benchmarks (repeatable; --skip too), merged into results.json
    python bench/run_all.py --quick         # a smoke run at small sizes (a few minutes)

Run it on a quiet machine: every benchmark also reports its own load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = sorted(p.stem for p in HERE.glob("*.py") if p.stem != "run_all")
#: Arguments of a full run and of a smoke run (--quick), per benchmark.
FULL_ARGS: dict[str, list[str]] = {}
QUICK_ARGS: dict[str, list[str]] = {
    "attest": ["--dim", "1000000", "--repeat", "2"],
    "audit": ["--rounds", "100", "--repeat", "1"],
    "dp": ["--repeat", "1"],
    "encoding": ["--dim", "1000000", "--repeat", "2"],
    "flower": ["--dim", "10000", "--nodes", "3"],
    "he": ["--dim", "20000", "--clients", "3"],
    "scale": ["--max-d", "1e6"],
    "secagg": ["--scale", "0.01"],
    "trainer": ["--quick"],
}
TIMEOUT_S = {"scale": 3600}
HISTORY = "\n## History\n"  # results.md from this heading on is written by hand
SERIES = (("plain", "Plain"), ("secagg+", "SecAgg+"), ("ckks", "CKKS"), ("bfv", "BFV"))


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    versions = {}
    for pkg in ("securefed", "numpy", "numba", "cryptography", "tenseal", "torch", "flwr"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "memory_gib": round(memory, 1),
            "system": platform.platform(), "python": platform.python_version(), "versions": versions}


def run_bench(name: str, args: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    load = os.getloadavg()[0]
    start, t = time.time(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S.get(name, 1800))
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = -1, e.stdout or "", f"timed out after {e.timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    lines = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {"command": " ".join(["python", f"bench/{name}.py", *args]), "returncode": code,
            "started": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t, 1), "load_average_at_start": round(load, 2),
            "lines": lines, "stderr_tail": err[-3000:] if code else ""}


def _rounds(results: dict) -> list[dict]:
    lines = results["benchmarks"].get("scale", {}).get("lines", [])
    return [r for r in lines if str(r.get("config", "")).startswith("round_") and "error" not in r]


def plot(results: dict, path: Path) -> bool:
    rounds = _rounds(results)
    if not rounds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in SERIES:
        rs = sorted((r for r in rounds if r["protocol"] == key), key=lambda r: r["d"])
        if not rs:
            continue
        name = f"{label} (n={rs[0]['n']})"
        ax_t.plot([r["d"] for r in rs], [r["round_wall_s"] for r in rs], marker="o", label=name)
        ax_m.plot([r["d"] for r in rs], [r["peak_rss_mb"] / 1024 for r in rs], marker="o", label=name)
    for ax, ylabel in ((ax_t, "round time, wall clock (s)"), (ax_m, "peak RSS of the process (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (parameters per client update)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"One simulated round, all parties in one process ({m['cpu']}, {m['cpus']} CPUs, "
                 f"{m['memory_gib']} GiB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _trainer_table(results: dict) -> list[str]:
    """``bench/trainer.py``'s rounds: the time split, the ratio to Plain, the peak memory growth, the lines."""
    lines = [r for r in results["benchmarks"].get("trainer", {}).get("lines", []) if "error" not in r]
    if not lines:
        return []
    head = ("| trainer round | participants | trained parameters | SecAgg+ round (s): local training / client / "
            "server / other | Plain round (s) | SecAgg+ / Plain: wall (CPU) | peak RSS growth, SecAgg+ (MB; x fp32 "
            "model) | load average |")
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in lines:
        cpu = r.get("secure_over_plain_cpu")
        out.append(f"| {r['config']} | {r['participants']} | {r['trained_parameters']:,} | {r['secure_round_s']:.1f}: "
                   f"{r['secure_local_training_s']:.1f} / {r['secure_client_protocol_s']:.1f} / "
                   f"{r['secure_server_protocol_s']:.1f} / {r['secure_other_s']:.1f} | {r['plain_round_s']:.1f} | "
                   f"{r['secure_over_plain']:.2f}{'' if cpu is None else f' ({cpu:.2f})'} | "
                   f"{r['peak_rss_growth_mb']:.0f} ({r['peak_rss_growth_over_model']}x) | {r['load_average_1min']} |")
    return [*out, "", "```", *(json.dumps(r) for r in lines), "```", ""]


def _history(md: Path) -> str:
    """The hand-kept History section of an existing results.md (from its heading on), kept across runs."""
    text = md.read_text() if md.exists() else ""
    at = text.find(HISTORY)
    return "" if at < 0 else text[at:]


def table(results: dict) -> str:
    m = results["machine"]
    out = [(f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}; "
            f"run {results['started']} (`{results['command']}`), load average {results['load_average_at_start']} "
            "at the start."), ""]
    rounds = _rounds(results)
    if rounds:
        out += ["| protocol | n | d | round (s) | peak RSS (MB) | upload / client (MB) | max error (bound) |",
                "|---|---|---|---|---|---|---|"]
        order = {key: i for i, (key, _) in enumerate(SERIES)}
        for r in sorted(rounds, key=lambda r: (order.get(r["protocol"], 9), r["d"])):
            label = dict(SERIES).get(r["protocol"], r["protocol"])
            out.append(f"| {label} | {r['n']} | 10^{round(math.log10(r['d']))} | {r['round_wall_s']:.2f} | "
                       f"{r['peak_rss_mb']:.0f} | {_mb(r['upload_bytes_per_client'])} | "
                       f"{r['max_abs_error']:.2g} ({r['error_bound']:.2g}) |")
        out.append("")
    scale = {r.get("config"): r for r in results["benchmarks"].get("scale", {}).get("lines", [])}
    mem = scale.get("client_memory_d1e7")
    if mem and "error" not in mem:
        out.append(f"Client memory above its input while masking (d = 10^7, k = {mem['neighbours']} neighbours): "
                   f"{_mb(mem['peak_above_input_bytes'])} MB = {mem['peak_above_input_over_update']}x its fp32 update "
                   f"(tracemalloc; RSS: {mem['rss_peak_above_before_over_update']}x).")
    thr = scale.get("threads_d1e7_k10")
    if thr and "error" not in thr:
        out.append(f"Mask expansion, d = 10^7, k = {thr['neighbours']} (+ self mask): 1 thread "
                   f"{thr['mask_expansion_1t_wall_s']} s, 2 threads {thr['mask_expansion_2t_wall_s']} s "
                   f"(speedup {thr['mask_expansion_speedup']}x); whole masked-input step "
                   f"{thr['client_step_1t_wall_s']} s / {thr['client_step_2t_wall_s']} s "
                   f"({thr['client_step_speedup']}x); server unpacking of one input "
                   f"{thr['server_unpack_1t_wall_s']} s / {thr['server_unpack_2t_wall_s']} s "
                   f"({thr['server_unpack_speedup']}x).")
        if "mask_expansion_gil_held_share" in thr:
            out[-1] += (f" Python holds the GIL for {100 * thr['mask_expansion_gil_held_share']:.1f}% of the masking "
                        f"work, which allows up to {thr['mask_expansion_speedup_bound_2t']}x on two free cores.")
    out.append("")
    out += _trainer_table(results)
    out.append("| benchmark | configurations | wall (s) | load average at its start | status |")
    out.append("|---|---|---|---|---|")
    for b in results["benchmarks"].values():
        status = "ok" if b["returncode"] == 0 else f"exit {b['returncode']}"
        out.append(f"| `{b['command']}` | {len(b['lines'])} | {b['wall_s']} | {b['load_average_at_start']} "
                   f"| {status} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=BENCHES, help="run only these benchmarks")
    ap.add_argument("--skip", action="append", choices=BENCHES, default=[], help="leave these out")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    ap.add_argument("--out", type=Path, default=HERE, help="directory for results.json, scale.png, results.md")
    args = ap.parse_args()
    names = [n for n in (args.only or BENCHES) if n not in args.skip]
    results = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run_all.py", *sys.argv[1:]]),
        "quick": args.quick, "machine": machine(), "load_average_at_start": round(os.getloadavg()[0], 2),
        "benchmarks": {},
    }
    t = time.perf_counter()
    for name in names:
        extra = (QUICK_ARGS if args.quick else FULL_ARGS).get(name, [])
        print(f"[run_all] {name} {' '.join(extra)}", file=sys.stderr, flush=True)
        results["benchmarks"][name] = res = run_bench(name, extra)
        for line in res["lines"]:
            print(json.dumps(line), flush=True)
        if res["returncode"]:
            print(f"[run_all] {name} failed ({res['returncode']}):\n{res['stderr_tail']}", file=sys.stderr, flush=True)
    results["duration_s"] = round(time.perf_counter() - t, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "results.json"
    if args.only and previous.exists():  # a partial run updates those benchmarks and keeps the others
        kept = json.loads(previous.read_text())
        if kept.get("quick") == args.quick and kept.get("machine", {}).get("cpu") == results["machine"]["cpu"]:
            results["benchmarks"] = {**kept.get("benchmarks", {}), **results["benchmarks"]}
            results["command"] = f"{kept.get('command')}; then {results['command']}"
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    drawn = plot(results, args.out / "scale.png")
    md = args.out / "results.md"
    md.write_text(table(results) + _history(md))
    print(f"[run_all] {results['duration_s']} s; wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f", {args.out / 'scale.png'}" if drawn else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
