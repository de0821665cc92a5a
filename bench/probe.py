"""Quick dp-mepf probe on MNIST: one setting in about 11 minutes of one core, to compare settings.

    python -m bench.probe TAG [steps=1000] [f.grid=2] [lr=0.002] [f.name=resnet20-cifar10] ...

`f.KEY=V` sets an encoder argument (name, weights, input_size, pixels, pixel_size, grid), `eps=E`
the target epsilon, any other `KEY=V` a `dpmepf` recipe key. The noisy releases (the real
`Generator.release` on the 55k private split, delta 1.67e-6, PRV) are cached per encoder and
budget under bench-work/probe/, so settings that only change training share one release. The
generator is trained by the real `Generator.train`, then judged on 20k samples:

- `fidelity`: how often a classifier trained on the real private split (3 epochs, cached) gives
  a sample the label it was drawn for;
- `val`: the best validation accuracy over 6 epochs of the downstream SmallCNN trained on the
  20k samples (the validation split, never the test set).

Both are proxies for the full protocol (`python -m bench run`: 60k samples, 10 epochs, test
accuracy); rows go to benchmarks/probes.jsonl and a 10 x 16 sample grid to bench-work/probe/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.mnist import _tensors, prepare
from privsynth.data import scan
from privsynth.downstream import ClassifierConfig, SmallCNN, accuracy, train_classifier
from privsynth.features import load_encoder
from privsynth.generators import dpmepf
from privsynth.privacy import Budget

DELTA = 1.67e-6  # 1 / (N ln N), N = 55,000


def parse(args: list[str]) -> tuple[dict, dict, float]:
    """Encoder arguments, dpmepf config overrides and epsilon from KEY=V words."""
    feat = {"name": "efficientnet-lite0", "weights": None, "input_size": 32, "pixels": 0.5,
            "pixel_size": 14, "grid": 1}
    fields = {f.name: f for f in dataclasses.fields(dpmepf.Config)}
    gen, eps = {}, 10.0
    for word in args:
        key, value = word.split("=", 1)
        if key.startswith("f."):
            key = key[2:]
            feat[key] = value if feat[key] is None else type(feat[key])(value)
        elif key == "eps":
            eps = float(value)
        elif key in fields:
            default = getattr(dpmepf.Config(), key)
            gen[key] = value.lower() == "true" if isinstance(default, bool) else type(default)(value)
        else:
            raise SystemExit(f"unknown key {key!r}")
    return feat, gen, eps


def judge(work: Path, folders: dict) -> SmallCNN:
    """The real-data classifier that scores fidelity (trained once, cached)."""
    path = work / "probe" / "judge.safetensors"
    model = SmallCNN(1, 10)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x, y = _tensors(folders["private"])
    vx, vy = _tensors(folders["val"])
    model, _ = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=3))
    save_file(model.state_dict(), str(path))
    return model


def main(argv: list[str] | None = None) -> dict:
    """Run one probe and append its row."""
    argv = sys.argv[1:] if argv is None else argv
    tag, (feat, gen, eps) = argv[0], parse(argv[1:])
    work = Path("bench-work")
    folders = prepare(work)
    (work / "probe").mkdir(parents=True, exist_ok=True)
    cfg = dpmepf.Config(**gen)
    torch.manual_seed(0)
    name = feat.pop("name")
    encoder = load_encoder(name, **feat)
    release_key = json.dumps([name, feat, eps, cfg.share_phi1, cfg.share_phi2, cfg.share_counts,
                              cfg.phi2_bound])
    cache = work / "probe" / f"release-{hashlib.sha1(release_key.encode()).hexdigest()[:10]}.pt"
    g = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    listing = scan(folders["private"])
    if cache.exists():
        rel = dpmepf.Releases(**torch.load(cache))
    else:
        budget = Budget(epsilon=eps, delta=DELTA, accountant="prv")
        rel = g.release(listing, budget, g.plan(budget))
        torch.save(rel.__dict__, cache)
    t0 = time.time()
    sampler = g.train(rel, listing.classes)
    train_s = time.time() - t0
    x, y = sampler.sample(20000, seed=1)
    fidelity = accuracy(judge(work, folders), x, y)
    vx, vy = _tensors(folders["val"])
    _, curve = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=6))
    rows = [torch.cat([x[i, 0] for i in (y == k).nonzero()[:16, 0]], 1) for k in range(10)]
    Image.fromarray(torch.cat(rows, 0).numpy()).save(work / "probe" / f"{tag}.png")
    row = {"tag": tag, "args": argv[1:], "encoder": encoder.name, "dim": encoder.dim,
           "train_s": round(train_s), "per_step_s": train_s / cfg.steps, "fidelity": fidelity,
           "val": max(curve), "curve": curve}
    print(json.dumps(row), flush=True)
    with open(Path("benchmarks") / "probes.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
