"""A PNG of downstream accuracy against epsilon: our latest row per (method, epsilon) from
results.jsonl with each downstream classifier's figure (SmallCNN, and the ResNet where the row has
it), the DPImageBench anchors, and each classifier's real-data ceiling. Drawn with Pillow only.
Rows whose `--set` overrides change their recipe (ablations), and rows whose recipe is not what
`bench run` makes now for their command (stale: see `_stale`), are not drawn."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from privsynth import recipe as recipes

# The downstream classifiers (bench.mnist.FIELDS): row field, marker, line width, ceiling colour
CLASSIFIERS = {"SmallCNN": ("accuracy", "circle", 3, (0, 150, 0)),
               "ResNet": ("accuracy_resnet", "diamond", 1, (0, 90, 0))}
# DPImageBench accuracy (%) at epsilon 1 and 10 (benchmarks/README.md).
ANCHORS = {"mnist": {"DP-MERF": (80.3, 81.3), "DPDM": (89.2, 97.7), "PrivImage": (94.0, 97.8),
                     "DP-FETA": (95.6, 98.1)},
           "cifar10": {"DP-MERF": (27.2, 29.0), "DPDM": (28.9, 36.8), "DP-FETA": (35.1, 43.3),
                       "PE": (64.6, 75.3), "PrivImage": (74.5, 78.4)}}
OURS = {"dp-mepf": (200, 30, 30), "privimage": (30, 110, 220)}
GREYS = [(150, 150, 150), (120, 120, 120), (90, 90, 90), (170, 140, 100), (110, 150, 110)]
DASH = {"dash": 8, "dot": 3}  # ceiling lines: dash length of the SmallCNN's, the ResNet's
W, H, LEFT, RIGHT, TOP, BOTTOM = 960, 560, 80, 290, 50, 70
EPS_RANGE = (0.7, 14.0)


def latest(rows: list[dict], dataset: str, field: str = "accuracy"
           ) -> tuple[dict[str, dict[float, float]], float | None]:
    """{method: {epsilon target: accuracy %}} from the newest row of each (no point where that
    row lacks `field`: a classifier's figures all come from the run the other's come from),
    averaged with the newest row of each other seed (`bench run --seed`) that ran the same
    configuration; and the newest ceiling that has `field`. `field`: "accuracy" (SmallCNN) or
    "accuracy_resnet"."""
    newest: dict[tuple[str, float], dict] = {}
    seeds: dict[tuple[str, float], dict[int, dict]] = {}
    ceiling = None
    for row in rows:  # file order is time order: later rows replace earlier ones
        if row["dataset"] != dataset:
            continue
        if row["method"].startswith("real data"):
            ceiling = 100 * row[field] if field in row else ceiling
            continue
        if _ablation(row) or _stale(row):
            continue
        key = (row["method"], float(row["epsilon_target"]))
        newest[key] = row
        seeds.setdefault(key, {})[row.get("seed", 0)] = row
    series: dict[str, dict[float, float]] = {}
    for (method, eps), row in newest.items():
        if field not in row:
            continue
        same = [r for r in seeds[(method, eps)].values()
                if field in r and _configuration(r) == _configuration(row)] or [row]
        series.setdefault(method, {})[eps] = 100 * sum(r[field] for r in same) / len(same)
    return series, ceiling


def _configuration(row: dict) -> str | None:
    """The row's resolved recipe without its budget and seed, as a comparable string (rows from
    before recipes were recorded: their commit and recipe file, so only they themselves match)."""
    if "resolved" not in row:
        return f"{row.get('commit')}:{row.get('recipe')}:{row.get('overrides')}"
    return json.dumps(_setting(recipes.from_dict(row["resolved"])), sort_keys=True)


def _stale(row: dict) -> bool:
    """Whether the row's recipe differs from the one `bench run` makes now for its command
    (`_now`): the resolved recipe the row recorded, or for older rows its recipe file as it read
    at the row's commit (git show; comments do not count). Epsilon and delta are the row's own
    and do not count. Unknown (no git, unknown commit): not stale."""
    import subprocess

    import tomllib

    if "resolved" in row:
        then = recipes.from_dict(row["resolved"])
    else:
        try:
            res = subprocess.run(["git", "show", f"{row.get('commit', '')}:{row['recipe']}"],
                                 capture_output=True, text=True, cwd=Path(__file__).parents[1])
        except OSError:
            return False
        if res.returncode != 0:
            return False
        try:
            then = recipes.resolve(tomllib.loads(res.stdout))
        except Exception:  # a key the current code no longer reads: another recipe
            return True
    try:
        now = _now(row, [])
    except Exception:  # its recipe file is gone: nothing makes that row now
        return True
    return _setting(then) != _setting(now)


def _now(row: dict, overrides: list[str]) -> recipes.Recipe:
    """The recipe `bench run` makes now for the row's dataset, method, epsilon, recipe file and
    `overrides` (bench.mnist.resolved). A row made with the bench's former default file
    (recipes/<dataset>-<method>.toml, removed when the defaults took its values) is now made
    with the defaults."""
    from bench import mnist

    file = row.get("recipe")
    former = f"{row['dataset']}-{row['method'].replace('-', '')}.toml"
    if file and Path(file).name == former and not Path(file).exists():
        file = None
    return mnist.resolved(row["dataset"], row["method"], row["epsilon_target"], file, overrides)


def _setting(recipe: recipes.Recipe) -> dict:
    """The recipe without the budget (epsilon, delta), which a row states in its own fields, and
    without run.seed (a second seed of a row runs the same configuration)."""
    out = recipe.to_dict()
    out["privacy"] = {k: v for k, v in out["privacy"].items() if k not in ("epsilon", "delta")}
    out["run"] = {k: v for k, v in out["run"].items() if k != "seed"}
    return out


def _ablation(row: dict) -> bool:
    """Whether the row's overrides change its recipe (as `bench run` resolves it now)."""
    if not row.get("overrides"):
        return False
    return _setting(_now(row, row["overrides"])) != _setting(_now(row, []))


def draw(rows: list[dict], dataset: str, out: Path) -> Path:
    """Write the chart for `dataset` to `out`."""
    found = {name: latest(rows, dataset, field) for name, (field, *_) in CLASSIFIERS.items()}
    anchors = ANCHORS.get(dataset, {})
    values = [a for pair in anchors.values() for a in pair] + \
        [a for series, ceiling in found.values()
         for a in [v for s in series.values() for v in s.values()] + ([ceiling] if ceiling else [])]
    lo = max(0.0, 10 * math.floor(min(values + [80.0]) / 10) - 5)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP

    def px(eps: float) -> float:
        a, b = (math.log(e) for e in EPS_RANGE)
        return x0 + (math.log(eps) - a) / (b - a) * (x1 - x0)

    def py(acc: float) -> float:
        return y0 - (acc - lo) / (100.0 - lo) * (y0 - y1)

    d.rectangle([x0, y1, x1, y0], outline="black")
    for acc in range(int(lo), 101, 5):
        d.line([x0 - 4, py(acc), x1, py(acc)], fill=(230, 230, 230) if acc % 10 else (205, 205, 205))
        d.text((x0 - 30, py(acc) - 6), f"{acc}", fill="black", font=font)
    for eps in (1, 2, 5, 10):
        d.line([px(eps), y0, px(eps), y0 + 5], fill="black")
        d.text((px(eps) - 4, y0 + 8), f"{eps}", fill="black", font=font)
    d.text(((x0 + x1) / 2 - 60, y0 + 30), "epsilon (log scale)", fill="black", font=font)
    d.text((10, y1 - 18), "downstream accuracy % (real test set)", fill="black", font=font)
    d.text((x0, 8), f"{dataset.upper()}: accuracy against epsilon (ours: latest row of "
                     "benchmarks/results.jsonl, averaged over its seeds)", fill="black", font=font)
    d.text((x0, 24), "ours: circles and thick lines, SmallCNN; diamonds and thin lines, ResNet "
                     "(the anchors' classifier is a ResNet / WRN)", fill="black", font=font)
    legend = []
    for name, (_, _, _, green) in CLASSIFIERS.items():
        ceiling = found[name][1]
        if ceiling is not None:
            dash = "dash" if name == "SmallCNN" else "dot"
            _dashed(d, x0, x1, py(ceiling), green, DASH[dash])
            legend.append((f"real data (ceiling, {name}) {ceiling:.1f}", green, dash))
    for (name, (a1, a10)), colour in zip(anchors.items(), GREYS):
        _line(d, [(px(1), py(a1)), (px(10), py(a10))], colour, 1, "square")
        legend.append((f"{name} (DPImageBench)", colour, "square"))
    for name, (_, mark, width, _) in CLASSIFIERS.items():
        for method, points in sorted(found[name][0].items()):
            colour = OURS.get(method, (0, 0, 0))
            _line(d, [(px(e), py(a)) for e, a in sorted(points.items())], colour, width, mark)
            for e, a in sorted(points.items()):
                at = (px(e) + 7, py(a) - 14) if mark == "circle" else (px(e) - 34, py(a) - 6)
                d.text(at, f"{a:.1f}", fill=colour, font=font)
            legend.append((f"privsynth {method} ({name})", colour, mark))
    for i, (label, colour, mark) in enumerate(legend):
        y = y1 + 10 + 20 * i
        if mark in DASH:
            _dashed(d, x1 + 15, x1 + 45, y + 6, colour, DASH[mark])
        else:
            _line(d, [(x1 + 15, y + 6), (x1 + 45, y + 6)], colour, 3 if mark == "circle" else 1,
                  mark)
        d.text((x1 + 52, y), label, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _line(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: tuple, width: int,
          mark: str | None) -> None:
    if len(pts) > 1:
        d.line(pts, fill=colour, width=width)
    for x, y in pts if mark else ():
        if mark == "diamond":
            d.polygon([(x, y - 5), (x + 5, y), (x, y + 5), (x - 5, y)], fill=colour)
        else:
            box = [x - 4, y - 4, x + 4, y + 4]
            (d.ellipse if mark == "circle" else d.rectangle)(box, fill=colour)


def _dashed(d: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: tuple,
            dash: int = 8) -> None:
    x = x0
    while x < x1:
        d.line([x, y, min(x + dash, x1), y], fill=colour, width=2)
        x += dash + 6


def run(args) -> Path:
    """Read results.jsonl and write benchmarks/accuracy-<dataset>.png."""
    results = Path(args.results)
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()
            if line.strip()]
    out = draw(rows, args.dataset, results / f"accuracy-{args.dataset}.png")
    print(out)
    return out
