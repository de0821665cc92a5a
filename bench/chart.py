"""A PNG of downstream accuracy against epsilon: our latest row per (method, epsilon) from
results.jsonl, the DPImageBench anchors, and the real-data ceiling. Drawn with Pillow only.
Rows whose `--set` overrides change their recipe (ablations), and rows whose recipe is not what
`bench run` makes now for their command (stale: see `_stale`), are not drawn."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from privsynth import recipe as recipes

# DPImageBench accuracy (%) at epsilon 1 and 10 (benchmarks/README.md).
ANCHORS = {"mnist": {"DP-MERF": (80.3, 81.3), "DPDM": (89.2, 97.7), "PrivImage": (94.0, 97.8),
                     "DP-FETA": (95.6, 98.1)},
           "cifar10": {"DP-MERF": (27.2, 29.0), "PE": (64.6, 75.3), "PrivImage": (74.5, 78.4)}}
OURS = {"dp-mepf": (200, 30, 30), "privimage": (30, 110, 220)}
GREYS = [(150, 150, 150), (120, 120, 120), (90, 90, 90), (170, 140, 100), (110, 150, 110)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 560, 80, 250, 50, 70
EPS_RANGE = (0.7, 14.0)


def latest(rows: list[dict], dataset: str) -> tuple[dict[str, dict[float, float]], float | None]:
    """{method: {epsilon target: accuracy %}} from the newest row of each, and the ceiling."""
    series: dict[str, dict[float, float]] = {}
    ceiling = None
    for row in rows:  # file order is time order: later rows replace earlier ones
        if row["dataset"] != dataset:
            continue
        if row["method"].startswith("real data"):
            ceiling = 100 * row["accuracy"]
            continue
        if _ablation(row) or _stale(row):
            continue
        series.setdefault(row["method"], {})[float(row["epsilon_target"])] = 100 * row["accuracy"]
    return series, ceiling


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
    """The recipe without the budget (epsilon, delta), which a row states in its own fields."""
    out = recipe.to_dict()
    out["privacy"] = {k: v for k, v in out["privacy"].items() if k not in ("epsilon", "delta")}
    return out


def _ablation(row: dict) -> bool:
    """Whether the row's overrides change its recipe (as `bench run` resolves it now)."""
    if not row.get("overrides"):
        return False
    return _setting(_now(row, row["overrides"])) != _setting(_now(row, []))


def draw(rows: list[dict], dataset: str, out: Path) -> Path:
    """Write the chart for `dataset` to `out`."""
    series, ceiling = latest(rows, dataset)
    anchors = ANCHORS.get(dataset, {})
    values = [a for pair in anchors.values() for a in pair] + \
        [a for s in series.values() for a in s.values()] + ([ceiling] if ceiling else [])
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
                     "benchmarks/results.jsonl)", fill="black", font=font)
    legend = []
    if ceiling is not None:
        _dashed(d, x0, x1, py(ceiling), (0, 150, 0))
        legend.append((f"real data (ceiling) {ceiling:.1f}", (0, 150, 0), "dash"))
    for (name, (a1, a10)), colour in zip(anchors.items(), GREYS):
        _line(d, [(px(1), py(a1)), (px(10), py(a10))], colour, 1, "square")
        legend.append((f"{name} (DPImageBench)", colour, "square"))
    for method, points in sorted(series.items()):
        colour = OURS.get(method, (0, 0, 0))
        pts = [(px(e), py(a)) for e, a in sorted(points.items())]
        _line(d, pts, colour, 3, "circle")
        for e, a in sorted(points.items()):
            d.text((px(e) + 7, py(a) - 14), f"{a:.1f}", fill=colour, font=font)
        legend.append((f"privsynth {method} (ours)", colour, "circle"))
    for i, (label, colour, mark) in enumerate(legend):
        y = y1 + 10 + 20 * i
        _line(d, [(x1 + 15, y + 6), (x1 + 45, y + 6)], colour, 3 if mark == "circle" else 1,
              None if mark == "dash" else mark)
        d.text((x1 + 52, y), label, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _line(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: tuple, width: int,
          mark: str | None) -> None:
    if len(pts) > 1:
        d.line(pts, fill=colour, width=width)
    for x, y in pts if mark else ():
        box = [x - 4, y - 4, x + 4, y + 4]
        (d.ellipse if mark == "circle" else d.rectangle)(box, fill=colour)


def _dashed(d: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: tuple) -> None:
    x = x0
    while x < x1:
        d.line([x, y, min(x + 8, x1), y], fill=colour, width=2)
        x += 14


def run(args) -> Path:
    """Read results.jsonl and write benchmarks/accuracy-<dataset>.png."""
    results = Path(args.results)
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()
            if line.strip()]
    out = draw(rows, args.dataset, results / f"accuracy-{args.dataset}.png")
    print(out)
    return out
