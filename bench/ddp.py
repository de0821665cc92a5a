"""Data-parallel speed-up of privimage's two training stages under torchrun.

    python -m bench ddp [--procs 1 2] [--threads 2] [--device cpu] [--dp-steps 20] ...

For each process count P, launches `torchrun --standalone --nproc-per-node P -m bench.ddp` with
threads/P torch threads per process (the same cores in total), which times `pretrain.pretrain`
(public pretraining, DDP) and `finetune.finetune` (DP-SGD: Poisson sample from rank 0, clipped
sums all-reduced, noise once per step) on random 28 px images -- the code `privsynth fit` runs.
The machine's load average is printed before and after: on a shared machine it says how far to
trust the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time")
    p.add_argument("--threads", type=int, default=2, help="torch threads in total (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--images", type=int, default=2000, help="private images (random)")
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--width", type=int, default=16, help="UNet width (demo recipe: 16)")
    p.add_argument("--batch", type=int, default=64, help="expected DP batch = pretraining batch")
    p.add_argument("--physical-batch", type=int, default=32, help="per-sample-gradient chunk")
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument("--dp-steps", type=int, default=20)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return p


def run(argv: list[str]) -> None:
    """Time every process count and print one row each (speed-up against the first)."""
    args = _parser().parse_args(argv)
    print(f"load average before: {_load()}", flush=True)
    rows = []
    for procs in args.procs:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(args.threads // procs, 1)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}", "-m", "bench.ddp", *argv]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{procs} processes failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'procs':>5} {'threads/proc':>12} {'pretrain s':>10} {'speed-up':>8} "
          f"{'DP-SGD s':>9} {'speed-up':>8}")
    for r in rows:
        print(f"{r['procs']:>5} {r['threads']:>12} {r['pretrain_s']:>10.2f} "
              f"{base['pretrain_s'] / r['pretrain_s']:>7.2f}x {r['dpsgd_s']:>9.2f} "
              f"{base['dpsgd_s'] / r['dpsgd_s']:>7.2f}x")
    print(f"load average after: {_load()}")
    if args.json:
        print(json.dumps(rows, indent=2))


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def worker(argv: list[str]) -> None:
    """One torchrun process: time pretraining and DP-SGD; rank 0 prints a JSON row."""
    import torch

    from privsynth import distributed
    from privsynth.data import ImageSet
    from privsynth.generators import privimage
    from privsynth.generators.privimage import finetune, pretrain
    from privsynth.privacy import Budget, Charge

    args = _parser().parse_args(argv)
    with distributed.session():
        cfg = privimage.Config(width=args.width, pretrain_batch=args.batch,
                               pretrain_steps=args.pretrain_steps, dp_batch=args.batch,
                               physical_batch=args.physical_batch, dp_steps=args.dp_steps,
                               draft="none", strength=1.0)
        device = distributed.device(args.device)
        unet_shape = privimage.Generator(cfg, resolution=args.resolution, channels=1)._unet(10)
        g = torch.Generator().manual_seed(0)
        shape = (args.images, 1, args.resolution, args.resolution)
        classes = tuple(str(i) for i in range(10))
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (args.images,), generator=g)
        priv, pub = ImageSet(images, labels, classes), ImageSet(images, labels, classes)
        charge = Charge("privimage.dpsgd", 1.0, args.batch / args.images, args.dp_steps, 1.0,
                        "bench")
        budget = Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[charge])
        t0 = _synced()
        model = pretrain.pretrain(unet_shape, lambda: pub, [[i] for i in range(10)], cfg, device=device)
        t1 = _synced()
        finetune.finetune(model, priv, budget, charge, cfg, device=device)
        t2 = _synced()
        if distributed.is_main():
            print(json.dumps({"procs": distributed.world(), "threads": torch.get_num_threads(),
                              "device": args.device, "pretrain_s": round(t1 - t0, 3),
                              "dpsgd_s": round(t2 - t1, 3), "pretrain_steps": args.pretrain_steps,
                              "dp_steps": args.dp_steps, "batch": args.batch,
                              "width": args.width, "resolution": args.resolution}), flush=True)


def _synced() -> float:
    """The time once every rank got here (and the GPU finished its work)."""
    import torch

    from privsynth import distributed

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    distributed.all_sum([torch.zeros(1)])  # a barrier
    return time.perf_counter()


if __name__ == "__main__":
    worker(sys.argv[1:])
