"""Time `privsynth evaluate` on N vs N MNIST digits (real files from ../shared/data/mnist.npz).

    python -m bench.evaluate_speed --n 10000 --work /tmp/evalbench [--test 2000] [--epochs 3]

MNIST training digits [0, N) stand in for the synthetic set, [N, 2N) for the real (private) set,
the first `--test` test digits for the held-out set. Runs the evaluation twice: cold (features
computed) and warm (features read from the cache), and prints one JSON line with the timings,
the throughput (images/s, decode + resize + network) and the load average, since other jobs on
the machine slow every number here down.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from privsynth.downstream import ClassifierConfig
from privsynth.evaluate import evaluate

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.npz"


def _write(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    if (folder / ".complete").exists():
        return folder
    for i, (img, label) in enumerate(zip(x, y)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / str(label) / f"{i:05d}.png", compress_level=1)
    (folder / ".complete").write_text("ok\n")
    return folder


def _log(what: str, done: int, total: int) -> None:
    """Progress on stderr with a timestamp and the load average, every 1000 images."""
    if done % 1000 == 0 or done == total:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {what} {done}/{total} "
                         f"load {os.getloadavg()[0]:.1f}\n")
        sys.stderr.flush()


def main() -> None:
    """Prepare the folders once, evaluate cold then warm, print the timings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--test", type=int, default=0, help="held-out test digits (0: none)")
    parser.add_argument("--epochs", type=int, default=0, help="classifier epochs (0: none)")
    parser.add_argument("--work", type=Path, default=Path("bench-work/evaluate"))
    args = parser.parse_args()
    data = np.load(MNIST)
    n = args.n
    synth = _write(args.work / f"synthetic{n}", data["x_train"][:n], data["y_train"][:n])
    real = _write(args.work / f"real{n}", data["x_train"][n:2 * n], data["y_train"][n:2 * n])
    test = (_write(args.work / f"test{args.test}", data["x_test"][:args.test],
                   data["y_test"][:args.test]) if args.test else None)
    out = args.work / "report"
    shutil.rmtree(out, ignore_errors=True)
    classifier = ClassifierConfig(epochs=args.epochs) if args.epochs else None
    row = {"n": n, "test": args.test, "epochs": args.epochs, "cpus": os.cpu_count()}
    for phase in ("cold", "warm"):
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        report = evaluate(synth, real, out, test=test, classifier=classifier, overwrite=True,
                          progress=_log)
        row[f"{phase}_s"] = round(time.perf_counter() - t0, 1)
        row[f"{phase}_load_avg"] = (round(load0, 1), round(os.getloadavg()[0], 1))
        row[f"{phase}_throughput_images_per_s"] = report["throughput_images_per_s"]
    run = report["runs"][0]
    row |= {"fid": run["fid"], "precision": run["precision"], "recall": run["recall"],
            "accuracy": run.get("utility", {}).get("accuracy")}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
