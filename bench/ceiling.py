"""The ceiling row: each downstream classifier trained on the real private training split itself
(same classifier, same validation-chosen epoch, same test set as every synthetic row)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

from bench import mnist


def run(args) -> dict:
    """Train on the real private split, score once on the test set, append the row."""
    work = Path(args.work)
    ds = args.dataset
    folders = mnist.prepare_dataset(ds, work)
    t0 = time.time()
    px, py = mnist._tensors(folders["private"], ds)
    scores = mnist.classify(args.classifier, (px, py),
                            *(mnist._tensors(folders[k], ds) for k in ("val", "test")))
    row = {"dataset": ds, "method": "real data (ceiling)", "epsilon": float("inf"),
           "epsilon_target": float("inf"), "delta": 0.0, "accountant": "-", "device": "cpu",
           **scores, "synthetic": 0, "fit_s": 0.0, "sample_s": 0.0, "total_s": time.time() - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "recipe": "-",
           "overrides": [f"trained on the {len(px)} real private images"],
           "commit": mnist._commit(), "run": "-", "note": "; ".join(args.notes)}
    mnist._append(Path(args.results), row)
    return row
