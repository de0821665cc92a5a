"""The ceiling row: the downstream classifier trained on the real private training split itself
(same classifier, same validation-chosen epoch, same test set as every synthetic row)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

from bench import mnist
from privsynth.downstream import ClassifierConfig, accuracy, train_classifier


def run(args) -> dict:
    """Train on the real private split, score once on the test set, append the row."""
    work = Path(args.work)
    ds = args.dataset
    folders = mnist.prepare_dataset(ds, work)
    t0 = time.time()
    px, py = mnist._tensors(folders["private"], ds)
    vx, vy = mnist._tensors(folders["val"], ds)
    tx, ty = mnist._tensors(folders["test"], ds)
    clf = ClassifierConfig()
    model, curve = train_classifier(px, py, vx, vy, classes=10, config=clf)
    row = {"dataset": ds, "method": "real data (ceiling)", "epsilon": float("inf"),
           "epsilon_target": float("inf"), "delta": 0.0, "accountant": "-", "device": "cpu",
           "accuracy": accuracy(model, tx, ty), "val_curve": curve, "classifier": clf.to_dict(),
           "synthetic": 0, "fit_s": 0.0, "sample_s": 0.0, "classifier_s": time.time() - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "recipe": "-", "overrides": [f"trained on the {len(px)} real private images"],
           "commit": mnist._commit(), "run": "-"}
    mnist._append(Path(args.results), row)
    return row
