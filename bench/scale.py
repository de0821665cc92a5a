"""Fit time against private-set size: the same recipe on the first 1k, 10k and 55k MNIST private
images, each fit a separate `privsynth fit` process (its own wall time and peak memory).

Subsets are hard links into the 55k private split (no copies). delta follows 1/(N ln N) for each
N, as a user's default would. Rows go to benchmarks/SCALING.md and scaling.jsonl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import mnist


def subset(private: Path, n: int) -> Path:
    """An ImageFolder with the first `n` private images (by index), hard-linked, made once."""
    if n >= 55000:
        return private
    folder = private.parent / f"private-{n}"
    if (folder / ".complete").exists():
        return folder
    for path in private.glob("*/*.png"):
        if int(path.stem) < n:
            (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            target = folder / path.parent.name / path.name
            if not target.exists():
                os.link(path, target)
    (folder / ".complete").write_text("ok\n")
    return folder


def fit_once(private: Path, public: Path | None, args, out: Path, ledger: Path) -> dict:
    """One `privsynth fit` subprocess; wall time and its own peak RSS (wait4)."""
    cmd = [sys.executable, "-m", "privsynth", "fit", str(private), "--method", args.method,
           "--epsilon", str(args.epsilon), "--out", str(out), "--ledger", str(ledger), "--json"]
    cmd += ["--recipe", args.recipe] if args.recipe else []  # none: the defaults
    cmd += [x for kv in args.overrides for x in ("--set", kv)]
    if public is not None:
        cmd += ["--public", str(public)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fit failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"fit_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, **json.loads(stdout)}


def run(args) -> list[dict]:
    """Fit at each size in `args.sizes`; append one row per size."""
    work = Path(args.work)
    folders = mnist.prepare(work)
    public = mnist.prepare_public(work) if args.method == "privimage" else None
    rows = []
    for n in args.sizes:
        tag = f"scale-{args.method}-n{n}-{time.strftime('%Y%m%d-%H%M%S')}"
        private = subset(folders["private"], n)
        got = fit_once(private, public, args, work / "runs" / tag, work / "ledger")
        row = {"dataset": "mnist", "method": args.method, "private_images": n,
               "epsilon": got["epsilon"], "delta": got["delta"], "fit_s": got["fit_s"],
               "peak_rss_mb": got["peak_rss_mb"], "recipe": args.recipe,
               "overrides": args.overrides, "commit": mnist._commit(),
               "load_1min": os.getloadavg()[0]}
        _append(Path(args.results), row)
        rows.append(row)
        print(row, flush=True)
    return rows


def _append(folder: Path, row: dict) -> None:
    mnist.append_row(folder, "scaling", row,
                     ["dataset", "method", "private images", "eps", "delta", "fit s", "peak RSS MB",
                      "load (1 min) at end", "commit", "overrides"],
                     [row["dataset"], row["method"], str(row["private_images"]),
                      f"{row['epsilon']:.3g}", f"{row['delta']:.2e}", f"{row['fit_s']:.0f}",
                      f"{row['peak_rss_mb']:.0f}", f"{row['load_1min']:.1f}", row["commit"],
                      " ".join(row["overrides"])])
