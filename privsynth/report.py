"""report.json -> one self-contained report.html: tables, sample grids (inline PNG), plots (SVG).

Opens from disk with no network: images are base64 data URIs, plots are SVG drawn here (no
plotting library), styles are inline. Every value whose field is listed in `not_covered_by_dp`
carries a red "not DP" mark; the memorisation section carries its owner-only label.
"""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.warn{background:#fff3f0;border:1px solid #e0a090;padding:.6em 1em;border-radius:4px}
.nodp{color:#b00;font-size:.75em;font-weight:600;margin-left:.3em;white-space:nowrap}
.grid img{image-rendering:pixelated;height:48px;vertical-align:middle}
.grid td{text-align:left}.pair img{image-rendering:pixelated;height:64px;margin:2px}
.pair{display:inline-block;margin:4px;text-align:center;font-size:.8em}
svg{background:#fff;margin:.3em 1em .3em 0}.muted{color:#666;font-size:.9em}"""
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _png(images: np.ndarray) -> str:
    """uint8 (N, C, H, W) -> one row of tiles as a base64 PNG <img> (C = 1 or 3)."""
    n, c, h, w = images.shape
    row = np.zeros((h, n * (w + 2), 3), dtype=np.uint8) + 255
    for i, im in enumerate(images):
        row[:, i * (w + 2):i * (w + 2) + w] = np.repeat(im, 3 // c, axis=0).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(row, "RGB").save(buf, format="PNG")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


class _Marks:
    """Looks up whether a field is in `not_covered_by_dp` (itself or a parent field)."""

    def __init__(self, report: dict) -> None:
        self.paths = set(report.get("not_covered_by_dp", []))

    def __call__(self, path: str) -> str:
        parts = path.split(".")
        hit = any(".".join(parts[:i]) in self.paths for i in range(1, len(parts) + 1))
        return ('<span class="nodp" title="computed from real images without differential '
                'privacy: not covered by the DP guarantee">not DP</span>') if hit else ""


def _axis(lo: float, hi: float, log: bool) -> tuple[float, float, list[float]]:
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    return lo, hi, ticks


def line_svg(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
             logx: bool = False, width: int = 330, height: int = 220, steps: bool = False) -> str:
    """A small line plot of named (x, y) series as inline SVG (`steps`: points kept in their
    order and drawn without dots, for histograms)."""
    pts = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    if not pts:
        return ""
    x0, x1, xt = _axis(min(p[0] for p in pts), max(p[0] for p in pts), logx)
    y0, y1, yt = _axis(min(p[1] for p in pts), max(p[1] for p in pts), False)
    left, right, top, bottom = 52, width - 10, 10, height - 38

    def sx(x: float) -> float:
        return left + (right - left) * ((math.log10(x) if logx else x) - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return bottom - (bottom - top) * (y - y0) / (y1 - y0)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-size="10" role="img" aria-label="{_e(ylabel)} against {_e(xlabel)}">',
           f'<path d="M{left},{top}V{bottom}H{right}" stroke="#444" fill="none"/>']
    for t in xt:
        x = left + (right - left) * (t - x0) / (x1 - x0)
        out.append(f'<text x="{x:.1f}" y="{bottom + 13}" text-anchor="middle">'
                   f'{(10 ** t if logx else t):.3g}</text>')
    for t in yt:
        out.append(f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 6}" text-anchor="middle">'
               f'{_e(xlabel)}{" (log)" if logx else ""}</text>')
    out.append(f'<text x="12" y="{(top + bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 12 {(top + bottom) / 2})">{_e(ylabel)}</text>')
    for i, (name, s) in enumerate(series.items()):
        s = [p for p in s if p[1] is not None and math.isfinite(p[1])]
        s = s if steps else sorted(s)
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        if not steps:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                    for x, y in s]
        if len(series) > 1:
            out.append(f'<text x="{right - 4}" y="{top + 12 * (i + 1)}" text-anchor="end" '
                       f'fill="{colour}">{_e(name)}</text>')
    return "\n".join(out + ["</svg>"])


def histogram_svg(edges: list[float], counts: dict[str, list[int]], xlabel: str,
                  width: int = 460, height: int = 220) -> str:
    """Overlaid histograms, each normalised to fractions, as inline SVG step lines."""
    series = {}
    for name, c in counts.items():
        total = max(sum(c), 1)
        series[name] = [(edges[i + j], c[i] / total) for i in range(len(c)) for j in (0, 1)]
    return line_svg(series, xlabel, "fraction of images", width=width, height=height, steps=True)


def _table(rows: list[list[str]], head: list[str]) -> str:
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def _summary(report: dict, mark: _Marks) -> str:
    rows = []
    for i, run in enumerate(report["runs"]):
        p = f"runs[{i}]"
        eps = run["privacy"]["epsilon"] if run.get("privacy") else "unknown"
        cell = lambda key, v: (_num(v) + mark(f"{p}.{key}")) if v is not None else "-"  # noqa: E731
        rows.append([_e(run["name"]), _num(eps), cell("fid", run["fid"]),
                     cell("kid", run["kid"]["mean"]), cell("precision", run["precision"]),
                     cell("recall", run["recall"]),
                     cell("utility", run.get("utility", {}).get("accuracy")),
                     cell("label_agreement", run.get("label_agreement", {}).get("agreement")),
                     cell("memorisation", run.get("memorisation", {}).get("suspicious_fraction"))])
    return _table(rows, ["run", "epsilon", "FID", "KID", "precision", "recall",
                         "test accuracy", "label agreement", "suspicious near-copies"])


def _sweep(report: dict) -> str:
    runs = [r for r in report["runs"] if r.get("privacy")]
    if len(runs) < 2:
        return ""
    eps = [r["privacy"]["epsilon"] for r in runs]
    logx = min(eps) > 0 and max(eps) / min(eps) >= 10
    plots = [line_svg({"FID": [(e, r["fid"]) for e, r in zip(eps, runs)]}, "epsilon", "FID", logx),
             line_svg({"precision": [(e, r["precision"]) for e, r in zip(eps, runs)],
                       "recall": [(e, r["recall"]) for e, r in zip(eps, runs)]},
                      "epsilon", "precision / recall", logx)]
    if all("utility" in r for r in runs):
        plots.append(line_svg({"accuracy": [(e, r["utility"]["accuracy"]) for e, r in zip(eps, runs)]},
                              "epsilon", "test accuracy", logx))
    if all("label_agreement" in r for r in runs):
        plots.append(line_svg({"agreement": [(e, r["label_agreement"]["agreement"])
                                             for e, r in zip(eps, runs)]},
                              "epsilon", "label agreement", logx))
    return ("<h2>Quality against epsilon</h2><p class=muted>One point per run; epsilon from each "
            "synthetic set's certificate.json. All values not DP (computed on real images).</p>"
            + "".join(plots))


def _grids(real: dict, synthetic: dict) -> str:
    rows = [[_e(name), _png(synthetic[name]) if len(synthetic.get(name, [])) else "-",
             _png(real[name]) if len(real.get(name, [])) else "-"]
            for name in sorted(set(real) | set(synthetic))]
    return '<div class="grid">' + _table(rows, ["class", "synthetic", "real"]) + "</div>"


def _utility(u: dict, mark: str) -> str:
    return (f"<h3>Utility{mark}</h3><p>Test accuracy <b>{u['accuracy']:.4f}</b> on "
            f"{u['test_images']} real test images; trained on {u['train_images']} synthetic images; "
            f"epoch {u['selected_epoch']} chosen on {_e(u['selected_on'])} "
            f"(validation accuracy {u['validation_accuracy']:.4f}), never on the test set.</p>"
            + line_svg({"validation": [(i + 1, a) for i, a in enumerate(u["validation_curve"])]},
                       "epoch", "validation accuracy")
            + f"<p class=muted>{_e(u['architecture'])}. Recipe: "
            + ", ".join(f"{_e(k)}={_e(v)}" for k, v in u["recipe"].items()) + ".</p>")


def _label_agreement(a: dict, mark: str) -> str:
    j = a["classifier"]
    return (f"<h3>Label agreement{mark}</h3><p>Label agreement <b>{a['agreement']:.4f}</b> on "
            f"{a['images']} synthetic images (chance {a['chance']:.3g}): the {_e(a['what'])}.</p>"
            + _table([[_e(k), _num(v["agreement"]), _num(v["images"])]
                      for k, v in a["per_class"].items()], ["class", "agreement", "images"])
            + f"<p class=muted>Classifier trained on {j['train_images']} real images; held-out "
            f"accuracy {j['held_out_accuracy']:.4f} on {j['held_out_images']} images of "
            f"{_e(j['held_out_on'])}; epoch {j['selected_epoch']} chosen on "
            f"{_e(j['selected_on'])}. {_e(j['architecture'])}. Recipe: "
            + ", ".join(f"{_e(k)}={_e(v)}" for k, v in j["recipe"].items()) + ".</p>")


def _memorisation(m: dict, pairs: list, mark: str) -> str:
    shown = "".join(f'<div class="pair">{_png(np.stack([a, b]))}<br>d={p["distance"]:.3g}<br>'
                    f'{_e(p["synthetic_file"])} / {_e(p["private_file"])}</div>'
                    for p, (a, b) in zip(m["closest"], pairs))
    return (f'<h3>Memorisation{mark}</h3><p class="warn"><b>{_e(m["label"])}.</b></p>'
            f"<p>{m['suspicious_fraction']:.2%} of synthetic images are closer to a private image "
            f"than {1 - m['quantile']:.0%} of held-out real images are (threshold "
            f"{m['threshold']:.4g}; about {m['expected_fraction']:.0%} expected without copying). "
            f"Exact copies: {m['exact_copies']}. Median nearest-private distance: synthetic "
            f"{m['synthetic_median']:.4g}, held-out real {m['holdout_median']:.4g}.</p>"
            + histogram_svg(m["histogram"]["edges"], {"synthetic": m["histogram"]["synthetic"],
                                                      "held-out real": m["histogram"]["holdout"]},
                            "distance to the nearest private image")
            + "<p>Closest pairs (synthetic left, private right):</p>" + shown)


def _run(i: int, run: dict, report: dict, gallery: dict, mark: _Marks) -> str:
    p = f"runs[{i}]"
    eps = run.get("privacy")
    out = [f"<h2>Run {_e(run['name'])}" + (f" (epsilon {eps['epsilon']:.4g}, delta "
                                            f"{eps['delta']:.3g})" if eps else "") + "</h2>",
           f"<p class=muted>{_e(run['synthetic']['path'])}: {run['synthetic']['images']} images, "
           f"{run['synthetic']['rejected']} rejected.</p>",
           _grids(gallery["real"], gallery["runs"][i])]
    if "per_class_fid" in run:
        out.append(f"<h3>FID per class{mark(p + '.per_class_fid')}</h3>" + _table(
            [[_e(k), _num(v)] for k, v in run["per_class_fid"].items()], ["class", "FID"]))
    if "utility" in run:
        out.append(_utility(run["utility"], mark(p + ".utility")))
    if "label_agreement" in run:
        out.append(_label_agreement(run["label_agreement"], mark(p + ".label_agreement")))
    if "memorisation" in run:
        out.append(_memorisation(run["memorisation"], gallery["pairs"][i], mark(p + ".memorisation")))
    out += [f"<p class=muted>Note: {_e(n)}</p>" for n in run["notes"]]
    return "\n".join(out)


def render_html(report: dict, gallery: dict) -> str:
    """The whole page. `gallery`: {"real": {class: uint8 (N,C,H,W)}, "runs": [same per run],
    "pairs": [[(synthetic CHW, private CHW), ...] per run]}."""
    mark, space = _Marks(report), report["feature_space"]
    sets = [[_e(k), _e(report[k]["path"]), _num(report[k]["images"]) + mark(k)]
            for k in ("real", "test", "val") if k in report]
    body = ["<h1>privsynth evaluation report</h1>",
            f'<p class="warn"><b>Owner only.</b> {_e(report["privacy_note"])} Values marked '
            f'{mark("real")} are not covered by the DP guarantee.</p>',
            f"<p>Feature space: <b>{_e(space['name'])}</b> ({_e(space['layer'])}, "
            f"{space['input_size']} px){'; ' + _e(space['note']) if 'note' in space else ''}. "
            f"Images compared at {report['resolution']} px.</p>",
            _summary(report, mark), _sweep(report),
            "<h2>Image sets</h2>" + _table(sets, ["role", "path", "images"])]
    body += [_run(i, run, report, gallery, mark) for i, run in enumerate(report["runs"])]
    body.append("<h2>Not covered by the DP guarantee</h2><ul>"
                + "".join(f"<li><code>{_e(p)}</code></li>" for p in report["not_covered_by_dp"])
                + "</ul><p class=muted>Versions: " + ", ".join(
                    f"{_e(k)} {_e(v)}" for k, v in report["versions"].items())
                + ". Feature throughput: " + (f"{report['throughput_images_per_s']} images/s"
                                              if report["throughput_images_per_s"] else
                                              "every set read from the cache")
                + f"; wall time {report['wall_time_s']} s.</p>")
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>privsynth report'
            f'</title><style>{STYLE}</style></head><body>' + "\n".join(body) + "</body></html>\n")
