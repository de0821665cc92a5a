"""How much class information the encoder's features carry, before any noise: a (non-private)
linear probe on a subset of a dataset's private split, scored on its validation split.

    python -m bench.linear_probe cifar10 [--sizes 32 64] [--grids 1 2] [--per-class 1000]

dp-mepf matches noisy class means of these features, and its label filter is a DP linear model on
them: a probe this weak on the real images bounds what the synthetic images can teach a classifier
(it says nothing of the noise). Each (input size, grid) gets a row in benchmarks/features.jsonl
and FEATURES.md: L-BFGS logistic regression (L2 1e-3) on standardised features, validation
accuracy (the test split is never read), and the extraction time of the train and validation
images at the threads torch was given.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import mnist
from privsynth.features import EfficientNetLite0

COLUMNS = ["dataset", "encoder", "input px", "grid", "dim", "train / val images", "val %",
           "extract s", "commit", "notes"]


def per_class(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of each class, in folder order."""
    keep = torch.cat([(y == c).nonzero()[:n, 0] for c in y.unique()])
    return x[keep], y[keep]


def features(encoder: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Encoder rows of uint8 images, in batches."""
    with torch.no_grad():
        return torch.cat([encoder(x[i:i + batch].float() / 255.0) for i in range(0, len(x), batch)])


def probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
          l2: float = 1e-3, iters: int = 300) -> float:
    """Validation accuracy of an L2-regularised logistic regression on standardised features."""
    (a, ya), (b, yb) = train, val
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    classes = int(ya.max()) + 1
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, ya) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias).argmax(1) == yb).float().mean().item()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.linear_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=["mnist", "cifar10"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="encoder input sides")
    ap.add_argument("--grids", type=int, nargs="+", default=[1, 2], help="features.grid values")
    ap.add_argument("--per-class", type=int, default=1000, help="private images per class")
    ap.add_argument("--note", dest="notes", action="append", default=[])
    ap.add_argument("--work", default="bench-work")
    ap.add_argument("--results", default="benchmarks")
    args = ap.parse_args(argv)
    folders = mnist.prepare_dataset(args.dataset, Path(args.work))
    x, y = per_class(*mnist._tensors(folders["private"], args.dataset), args.per_class)
    vx, vy = mnist._tensors(folders["val"], args.dataset)
    rows, commit = [], mnist._commit()
    for size in args.sizes:
        for grid in args.grids:
            encoder = EfficientNetLite0(input_size=size, grid=grid)
            t0 = time.time()
            a, b = features(encoder, x), features(encoder, vx)
            row = {"dataset": args.dataset, "encoder": encoder.name, "input_size": size,
                   "grid": grid, "dim": encoder.dim, "train": len(x), "val": len(vx),
                   "extract_s": time.time() - t0, "val_accuracy": probe((a, y), (b, vy)),
                   "threads": torch.get_num_threads(), "commit": commit,
                   "note": "; ".join(args.notes)}
            mnist.append_row(Path(args.results), "features", row, COLUMNS, [
                row["dataset"], "efficientnet-lite0", str(size), str(grid), str(row["dim"]),
                f"{row['train']} / {row['val']}", f"{100 * row['val_accuracy']:.1f}",
                f"{row['extract_s']:.0f}", commit, f"{row['threads']} thread(s); {row['note']}"])
            print(f"{args.dataset} input {size} grid {grid} dim {row['dim']}: "
                  f"val {100 * row['val_accuracy']:.1f} % (extract {row['extract_s']:.0f} s)",
                  flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
