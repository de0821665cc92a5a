"""The audit's files: audit.json (everything, per-canary scores included), scores.svg (the score
distributions of included and left-out canaries) and AUDIT.md (the result in words)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from privsynth.report import line_svg

_MEANING = {
    "consistent": "no evidence against the certificate: the measured lower bound does not exceed "
                  "the certified epsilon (this is not a proof that the certificate holds)",
    "VIOLATION": "the lower bound exceeds the certified epsilon: at this confidence the fit "
                 "does not meet its certificate (a false alarm has probability at most 1 - "
                 "confidence; rerun, and report it if it repeats)",
    "detected": "the positive control works: with the noise switched off the audit measures an "
                "epsilon above the certified one, so it can see a missing mechanism at this scale",
    "too weak": "the positive control failed: even without noise the audit cannot exceed the "
                "certified epsilon at this scale (more canaries, or a stronger score, are needed "
                "before a 'consistent' result means anything)",
}


def summary(result: dict) -> dict:
    """The result without the per-canary lists (what `--json` prints)."""
    kinds = {name: {"best": k["best"], "tried": k["tried"]} for name, k in result["kinds"].items()}
    return {k: v for k, v in result.items() if k not in ("membership", "kinds", "recipe")} | {
        "kinds": kinds}


def scores_svg(result: dict) -> str:
    """Histogram (as step lines) of the chosen score, included against left-out canaries."""
    values = np.array(result["kinds"][result["score"]]["scores"])
    member = np.array(result["membership"], dtype=bool)
    edges = np.histogram_bin_edges(values, bins=min(20, max(5, len(values) // 5)))
    series = {}
    for name, pick in (("included", member), ("left out", ~member)):
        counts, _ = np.histogram(values[pick], bins=edges)
        total = max(int(counts.sum()), 1)
        series[name] = [(float(edges[i + j]), counts[i] / total)
                        for i in range(len(counts)) for j in (0, 1)]
    return line_svg(series, f"score ({result['score']}; higher = guessed in)",
                    "fraction of canaries", width=460, steps=True)


def text(result: dict) -> str:
    """AUDIT.md: the numbers and what they mean."""
    g = result["guesses"] or {}
    control = (" (positive control: every noise draw was zero; this run's certificate does NOT "
               "hold)" if result["control"] == "no-noise" else "")
    lines = [f"# privsynth audit: {result['method']}{control}", "",
             f"- certified epsilon: {result['certified_epsilon']:.4g} (delta "
             f"{result['delta']:.3g})",
             f"- empirical lower bound: {result['epsilon_lower_bound']:.4g} at "
             f"{result['confidence']:.0%} confidence (score: {result['score']})",
             f"- verdict: **{result['verdict']}**: {_MEANING[result['verdict']]}",
             f"- ceiling: {result['ceiling']:.4g}, the bound if every guess were right (it grows "
             "with the canaries and shrinks with delta)",
             f"- canaries: {result['canaries']} ({result['included']} included by fair coins "
             "from OS entropy)",
             f"- guesses: {g.get('k_in', 0)} in ({g.get('correct_in', 0)} right), "
             f"{g.get('k_out', 0)} out ({g.get('correct_out', 0)} right), the rest abstained",
             f"- fit {result['fit_seconds']:.0f} s, audit in all {result['seconds']:.0f} s", "",
             "| score | k+ = k- | correct / guesses | lower bound |", "|---|---|---|---|"]
    for name, kind in result["kinds"].items():
        lines += [f"| {name} | {t['k_in']} | {t['correct']} / {t['guesses']} | "
                  f"{t['epsilon_lb']:.4g} |" for t in kind["tried"]]
    lines += ["", "![score distributions](scores.svg)", "",
              "A lower bound, not a proof: see docs/audit.md for what it shows and what it "
              "cannot. The audit's fit was discarded; nothing here is covered by the "
              "certificate, and audit.json holds which canary was included.", ""]
    return "\n".join(lines)


def write_report(out: Path, result: dict) -> None:
    """audit.json, scores.svg and AUDIT.md in a new folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "scores.svg").write_text(scores_svg(result) + "\n", encoding="utf-8")
    (out / "AUDIT.md").write_text(text(result), encoding="utf-8")
