"""A row's synthetic images scored again with another downstream classifier: `python -m bench
rescore TAG --classifier resnet` trains the classifier on WORK/synth/TAG (the images `bench run`
sampled for that row), chooses its epoch on the validation split, scores the test set once and
appends the row again with the new fields, so a row fitted before the ResNet existed gets both
figures without a second fit. The row is the first in results.jsonl naming run TAG (the one that
bench run wrote with those images; later rows naming the run sampled it elsewhere)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench import mnist
from privsynth.errors import UsageError


def find(rows: list[dict], tag: str) -> dict:
    """The first row whose run folder is named `tag`."""
    for row in rows:
        if Path(str(row.get("run", ""))).name == tag:
            return row
    raise UsageError(f"no row in results.jsonl ran {tag!r}")


def run(args) -> dict:
    """Score the row's synthetic folder with `args.classifier`; append the completed row."""
    work, results = Path(args.work), Path(args.results)
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()
            if line.strip()]
    row = find(rows, args.tag)
    synth = work / "synth" / args.tag
    if not (synth / "MANIFEST.sha256").exists():
        raise UsageError(f"{synth}: not a complete synthetic folder of row {args.tag!r}")
    ds = row["dataset"]
    folders = mnist.prepare_dataset(ds, work)
    t0 = time.time()
    scores = mnist.classify(args.classifier, mnist._tensors(synth, ds),
                            *(mnist._tensors(folders[k], ds) for k in ("val", "test")),
                            seed=row.get("seed", 0))
    commit = mnist._commit()
    words = (f"rescored {time.strftime('%Y-%m-%d')} with `python -m bench rescore {args.tag} "
             f"--classifier {args.classifier}` (code of {commit}, {time.time() - t0:.0f} s)")
    new = {**row, **scores, "rescore_commit": commit,
           "note": "; ".join(x for x in (row.get("note", ""), words, *args.notes) if x)}
    mnist._append(results, new)
    return new
