"""privimage's stages at demo scale: `make demo-privimage`'s fit -> sample -> evaluate with one
setting changed at a time, scored by label agreement and FID (efficientnet-lite0) against
assets/demo/real-test. Demo scale (2000 private digits, epsilon 10), not the DPImageBench protocol:
a quick measure of each stage's share. Rows in benchmarks/DEMO_ABLATIONS.md / demo_ablations.jsonl.

python -m bench.demo_ablation [--only NAME ...] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.mnist import _commit, append_row

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
SETTINGS = {  # name -> (what it shows, --set overrides of recipes/demo-privimage.toml)
    "recipe": ("the demo recipe: drafts, public and draft pretraining, DP-SGD", []),
    "no-drafts": ("no warm start: PrivImage as published (no drafts, sampling from pure noise "
                  "in 10 DDIM steps)", ["privimage.draft=none", "privimage.strength=1.0",
                                        "privimage.sample_steps=10"]),
    "no-dpsgd": ("warm start without DP fine-tuning", ["privimage.dp_steps=0"]),
    "random-selection": ("random instead of semantic public classes",
                         ["privimage.selection=random"]),
    "drafts-only": ("the drafts themselves (strength 0.001, one step: the UNet barely acts)",
                    ["privimage.strength=0.001"]),
}


def _cli(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "privsynth"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one(name: str, work: Path) -> dict:
    """Fit, sample 500, evaluate; the row."""
    what, sets = SETTINGS[name]
    out = work / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    _cli("fit", str(DEMO / "private"), "--public", str(DEMO / "public"), "--method", "privimage",
         "--epsilon", "10", "--recipe", str(ROOT / "recipes" / "demo-privimage.toml"),
         "--out", str(out / "run"), "--ledger", str(out / "ledger"),
         *[a for s in sets for a in ("--set", s)])
    fit_s = time.time() - t0
    _cli("sample", str(out / "run"), "-n", "500", "--out", str(out / "synthetic"), "--seed", "0")
    sample_s = time.time() - t0 - fit_s
    _cli("evaluate", str(out / "synthetic"), "--real", str(DEMO / "real-test"),
         "--out", str(out / "report"))
    run = json.loads((out / "report" / "report.json").read_text())["runs"][0]
    return {"setting": name, "what": what, "overrides": sets,
            "label_agreement": run["label_agreement"]["agreement"], "fid": run["fid"],
            "fit_s": round(fit_s), "sample_s": round(sample_s), "commit": _commit(),
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "load_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--work", default="bench-work/demo-ablation")
    p.add_argument("--results", default=str(ROOT / "benchmarks"))
    args = p.parse_args(argv)
    for name in args.only:
        row = one(name, Path(args.work))
        print(json.dumps(row), flush=True)
        append_row(Path(args.results), "demo_ablations", row,
                   ["setting", "label agreement", "FID", "fit s", "sample s", "threads",
                    "commit", "overrides"],
                   [row["setting"], f"{row['label_agreement']:.3f}", f"{row['fid']:.1f}",
                    str(row["fit_s"]), str(row["sample_s"]), row["threads"], row["commit"],
                    " ".join(row["overrides"]) or "(recipe)"])


if __name__ == "__main__":
    main()
