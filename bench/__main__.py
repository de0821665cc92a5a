"""Benchmark entry point: prepare data, fit -> sample -> evaluate, append a results row."""
from __future__ import annotations

import argparse
import sys

from bench import mnist
from bench.cost import MODES


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one benchmark row."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one dataset x method x epsilon row")
    run.add_argument("dataset", choices=["mnist", "cifar10"])
    run.add_argument("--method", default="dp-mepf", choices=["dp-mepf", "privimage"])
    run.add_argument("--epsilon", type=float, required=True)
    run.add_argument("--recipe", default=None, help="recipe file over the defaults for the data "
                     "(privsynth.defaults) [default: none]")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     help="recipe override section.key=value (repeatable)")
    run.add_argument("--synthetic", type=int, default=60000, help="synthetic images to sample")
    run.add_argument("--seed", type=int, default=None,
                     help="seed of the fit's public randomness (run.seed), of sampling and of the "
                          "downstream classifiers, for a second run of a row; the privacy noise "
                          "is never seeded [default: run.seed of the recipe, samples and "
                          "classifiers 0]")
    run.add_argument("--classifier", default="both", choices=["smallcnn", "resnet", "both"],
                     help="downstream classifier(s) trained on the synthetic images: the "
                          "SmallCNN (field accuracy, ~5 min on 60k images on 2 cores) and the "
                          "ResNet (accuracy_resnet, ~15 min) [default: both]")
    run.add_argument("--fitted", default=None, metavar="RUN",
                     help="a finished fit of this row (WORK/runs/TAG) whose bench process stopped "
                          "before writing the row: sample and score it instead of fitting again "
                          "(fit_s from the run folder's start stamp to its certificate)")
    run.add_argument("--note", dest="notes", action="append", default=[],
                     help="words for the row's notes, e.g. how loaded the machine was")
    run.add_argument("--work", default="bench-work", help="folder for data, runs and reports")
    run.add_argument("--results", default="benchmarks", help="folder holding RESULTS.md/results.jsonl")
    cost = sub.add_parser("cost", help="DP-SGD step time / plain step time on the privimage UNet")
    cost.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    cost.add_argument("--batch", type=int, default=32, help="examples per step")
    cost.add_argument("--resolution", type=int, default=28)
    cost.add_argument("--channels", type=int, default=1)
    cost.add_argument("--device", default="cpu")
    cost.add_argument("--reps", type=int, default=3, help="timed steps per mode (median)")
    cost.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    cost.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ceiling = sub.add_parser("ceiling", help="the classifier trained on the real private split")
    ceiling.add_argument("dataset", choices=["mnist", "cifar10"])
    ceiling.add_argument("--classifier", default="both", choices=["smallcnn", "resnet", "both"],
                         help="classifier(s) to train on the real private split [default: both]")
    ceiling.add_argument("--note", dest="notes", action="append", default=[],
                         help="words for the row's notes column, e.g. how loaded the machine was")
    rescore = sub.add_parser("rescore", help="a row's synthetic images scored with another "
                             "downstream classifier (the row appended again with its fields)")
    rescore.add_argument("tag", help="the row's run name (WORK/synth/TAG holds its images)")
    rescore.add_argument("--classifier", default="resnet", choices=["smallcnn", "resnet", "both"],
                         help="classifier(s) to train on the row's synthetic images "
                              "[default: resnet]")
    rescore.add_argument("--note", dest="notes", action="append", default=[],
                         help="words for the row's notes, e.g. how loaded the machine was")
    scale = sub.add_parser("scale", help="fit time against private-set size (1k, 10k, 55k)")
    scale.add_argument("dataset", choices=["mnist"])
    scale.add_argument("--method", default="dp-mepf", choices=["dp-mepf", "privimage"])
    scale.add_argument("--epsilon", type=float, default=10.0)
    scale.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 55000])
    scale.add_argument("--recipe", default=None, help="recipe file over the defaults for the "
                       "data (privsynth.defaults) [default: none]")
    scale.add_argument("--set", dest="overrides", action="append", default=[],
                       help="recipe override section.key=value (repeatable)")
    chart = sub.add_parser("chart", help="PNG of accuracy against epsilon with the anchors")
    chart.add_argument("dataset", nargs="?", default="mnist", choices=["mnist", "cifar10"])
    for p in (ceiling, rescore, scale, chart):
        p.add_argument("--work", default="bench-work", help="folder for data, runs and reports")
        p.add_argument("--results", default="benchmarks", help="folder of the results files")
    sub.add_parser("ddp", add_help=False,
                   help="torchrun speed-up of privimage pretraining and DP-SGD (see bench/ddp.py)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ddp"]:
        from bench import ddp

        ddp.run(argv[1:])
        return 0
    args = parser.parse_args(argv)
    if args.command in ("ceiling", "rescore", "scale", "chart"):
        import importlib

        importlib.import_module(f"bench.{args.command}").run(args)
        return 0
    if args.command == "cost":
        from bench import cost as costs

        costs.run(args)
        return 0
    row = mnist.run(args)
    print(row)
    return 0


sys.exit(main())
