"""`privsynth audit` at MNIST scale: 1000 canaries in the 55k private digits of the DPImageBench
split, each method as `bench run` fits it (the defaults for MNIST, or --recipe / --set), at
epsilon 1 and 10 with the real noise and the no-noise positive control at epsilon 1. Rows go to benchmarks/AUDIT.md and audit.jsonl; each
audit's AUDIT.md, audit.json and scores.svg stay in WORK/audits/.

python -m bench.audit [--methods dp-mepf privimage] [--epsilons [1 10]] [--control-epsilon 1]
                      [--canaries 1000] [--work bench-work] [--results benchmarks]
                      [--private FOLDER --public FOLDER --recipe FILE --set KEY=VALUE ...]

`--private` (and `--public`, `--recipe`, `--set`) audit another folder with another recipe: the
tests use them at a tiny scale.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.mnist import _commit, append_row, notes_cell, prepare, prepare_public, request
from privsynth.audit import audit

COLUMNS = ["method", "control", "certified eps", "delta", "canaries", "lower bound", "ceiling",
           "verdict", "correct / guesses", "score", "fit s", "audit s", "threads", "commit",
           "overrides and notes"]


def plan(methods: list[str], epsilons: list[float], control_epsilon: float | None) -> list[tuple]:
    """(method, epsilon, control) of every audit: the real noise at each epsilon, then the
    no-noise control at `control_epsilon` (None: no control)."""
    rows = [(m, e, "none") for m in methods for e in epsilons]
    return rows + ([(m, control_epsilon, "no-noise") for m in methods]
                   if control_epsilon is not None else [])


def one(args: argparse.Namespace, method: str, epsilon: float, control: str, private: Path,
        public: Path | None) -> dict:
    """Audit one (method, epsilon, control) and append its row."""
    raw = request(method, epsilon, args.recipe, args.overrides)  # what `bench run` fits
    tag = f"{method}-eps{epsilon:g}-{control}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    last = [0.0]

    def progress(what: str, done: int, total: int) -> None:
        if time.monotonic() - last[0] > 30 or done == total:
            last[0] = time.monotonic()
            print(f"  {tag}: {what} {done}/{total}", flush=True)

    result = audit(private, raw, public=public if method == "privimage" else None,
                   canaries=args.canaries, control=control,
                   out=Path(args.work) / "audits" / tag, progress=progress)
    g = result["guesses"] or {"correct": 0, "guesses": 0}
    row = {k: v for k, v in result.items() if k not in ("kinds", "membership", "recipe")}
    row.update(recipe=args.recipe, overrides=args.overrides, commit=_commit(),
               threads=os.environ.get("OMP_NUM_THREADS", "-"), private=str(private),
               note="; ".join(args.notes))
    append_row(Path(args.results), "audit", row, COLUMNS, [
        method, control, f"{result['certified_epsilon']:.4g}", f"{result['delta']:.2e}",
        str(result["canaries"]), f"{result['epsilon_lower_bound']:.3f}",
        f"{result['ceiling']:.3f}", result["verdict"], f"{g['correct']} / {g['guesses']}",
        result["score"], f"{result['fit_seconds']:.0f}", f"{result['seconds']:.0f}",
        row["threads"], row["commit"], notes(row)])
    return row


def notes(row: dict) -> str:
    """The row's last cell: its overrides, how the coins fell and what the guesser said, and the
    `--note` words."""
    g = row.get("guesses") or {}
    draw = (f"{row['included']} of {row['canaries']} canaries included by the coins"
            if "included" in row else "")
    if g.get("guesses"):
        draw += (f", {g['k_in']} guessed in and {g['k_out']} out ({g['correct_in']} and "
                 f"{g['correct_out']} right)")
    return notes_cell(" ".join(row.get("overrides") or []), draw, row.get("note", "")) or "-"


def main(argv: list[str] | None = None) -> int:
    """Run every planned audit; print one line per row."""
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dp-mepf", "privimage"],
                        choices=["dp-mepf", "privimage"])
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 10.0],
                        help="epsilons audited with the real noise (none given: only the control)")
    parser.add_argument("--control-epsilon", type=float, default=1.0,
                        help="epsilon of the no-noise control (a negative value: no control)")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--work", default="bench-work", help="folder for data and audit reports")
    parser.add_argument("--results", default="benchmarks", help="folder holding AUDIT.md")
    parser.add_argument("--private", default=None, help="audit this folder instead of MNIST")
    parser.add_argument("--public", default=None, help="privimage's public folder instead of "
                                                       "Tiny-ImageNet")
    parser.add_argument("--recipe", default=None,
                        help="recipe file [default: none, the defaults for the data]")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe override section.key=value (repeatable)")
    parser.add_argument("--note", dest="notes", action="append", default=[],
                        help="words for the rows' notes, e.g. how loaded the machine was")
    args = parser.parse_args(argv)
    work = Path(args.work)
    private = Path(args.private) if args.private else prepare(work)["private"]
    public = Path(args.public) if args.public else None
    if public is None and "privimage" in args.methods:
        public = prepare_public(work)
    control_epsilon = args.control_epsilon if args.control_epsilon > 0 else None
    for method, epsilon, control in plan(args.methods, args.epsilons, control_epsilon):
        row = one(args, method, epsilon, control, private, public)
        print(f"{method} eps={row['certified_epsilon']:.4g} control={control}: lower bound "
              f"{row['epsilon_lower_bound']:.3f} (ceiling {row['ceiling']:.3f}) "
              f"[{row['verdict']}], fit {row['fit_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
