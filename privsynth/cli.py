"""The `privsynth` command line: fit, sample, evaluate, verify, inspect.

Results go to stdout (a JSON document with --json), progress and messages to stderr. Library
errors become exit codes here and only here:
0 ok, 1 unexpected error, 2 usage (flags, recipe), 3 data (unreadable input folder),
4 budget (the privacy budget cannot pay), 5 missing resource (weights file),
6 verification failed, 130 interrupted (Ctrl-C), 141 stdout closed early (`| head`; quiet).
No ANSI codes on stderr unless it is a terminal and NO_COLOR is unset.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from privsynth import __version__
from privsynth.errors import PrivsynthError, UsageError, VerificationError

class _Group(TyperGroup):
    """Maps library errors to exit codes: the only place that decides how privsynth exits."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):  # usage errors, --help, Ctrl-C
            raise
        except PrivsynthError as exc:
            if getattr(exc, "echo_of_rank", None) is None:  # torchrun: the rank it came from says it
                err.print(f"[red]error{_rank_tag()}:[/]", escape(str(exc)), highlight=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            ctx.exit(130)
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
            ctx.exit(141)
        except Exception as exc:  # an unexpected bug: one line, no locals (set PRIVSYNTH_DEBUG=1)
            if os.environ.get("PRIVSYNTH_DEBUG"):
                raise
            if getattr(exc, "echo_of_rank", None) is None:
                err.print(f"[red]internal error{_rank_tag()}:[/]",
                          escape(f"{type(exc).__name__}: {exc}"))
            ctx.exit(1)


def _rank_tag() -> str:
    """' (rank N)' in a torchrun process other than rank 0 (from torchrun's RANK variable)."""
    rank = os.environ.get("RANK", "0")
    return f" (rank {escape(rank)})" if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1" else ""


app = typer.Typer(
    name="privsynth", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Differentially private synthetic image datasets, with a certificate anyone can re-check."
         "\n\nTypical use: inspect (free) -> fit (spends the privacy budget once) -> sample (free) "
         "-> evaluate."
         "\n\nExit codes: 0 ok, 1 internal error, 2 usage (flag, recipe, refusing to overwrite), "
         "3 data (unreadable folder; any reject under --strict), 4 budget, 5 missing resource "
         "(weights file), 6 verification failed, 130 interrupted, 141 stdout closed early.")
_NO_COLOR = bool(os.environ.get("NO_COLOR"))  # https://no-color.org: and no cursor codes either
err = Console(stderr=True, soft_wrap=True, no_color=_NO_COLOR or None,
              force_terminal=False if _NO_COLOR else None)

EXAMPLES_FIT = """
Examples:\n
  privsynth fit assets/demo/private --public assets/demo/public --method dp-mepf --epsilon 10 --out runs/demo\n
  privsynth fit ./xrays --method dp-mepf --epsilon 1 --recipe recipes/mnist-dpmepf.toml --set dpmepf.steps=500 --out runs/x1\n
  privsynth fit assets/demo/private --public assets/demo/public --method privimage --epsilon 10 --recipe recipes/demo-privimage.toml --out runs/pi

  privsynth fit --resume runs/x1   (finish a fit cut short by Ctrl-C, a crash or kill -9)

  torchrun --standalone --nproc-per-node 4 -m privsynth fit ... --method privimage --device cuda   (data-parallel, one GPU per process: README "Scaling out")
"""


class _Bars:
    """Rich progress bars on stderr, one per task description prefix."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=err, disable=not enabled, transient=False)
        self.tasks: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        key = what.split(" (")[0]
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(what, total=total)
        self.progress.update(self.tasks[key], completed=done, total=total, description=what)


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(human + "\n")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"privsynth {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """privsynth: private images in, a shareable synthetic dataset with a DP certificate out."""


@contextlib.contextmanager
def _resume_hint(out: Path):
    """After a failed or interrupted fit that spent budget, say how to finish it."""
    try:
        yield
    except BaseException:
        from privsynth import distributed, run

        if distributed.is_main() and (run.work_folder(out) / run.FIT_STATE).is_file():
            err.print(escape(f"the spend is recorded and the fit's state kept in "
                             f"{run.work_folder(out)}; finish it with: privsynth fit --resume {out}"))
        raise


@app.command(epilog=EXAMPLES_FIT)
def fit(
    private: Annotated[Optional[Path], typer.Argument(
        help="Private image folder: ImageFolder (one sub-folder per class), flat (unlabelled) or "
             "with metadata.jsonl.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="New run folder to write "
                                                "(never overwritten).")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Finish the interrupted fit of this run folder (its .RUN.work folder holds the "
             "recorded spend and the last saved state); takes no other option.")] = None,
    public: Annotated[Optional[Path], typer.Option(help="Public labelled image folder: privimage's "
                                                   "query and pretraining data (dp-mepf only records "
                                                   "it; its public side is the encoder).")] = None,
    method: Annotated[Optional[str], typer.Option(help="dp-mepf or privimage (or set `method` in the "
                                                  "recipe).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon for the whole run.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="Target delta (default 1/(N ln N)).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="TOML recipe file (see recipes/).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: "
                                                      "section.key=value (repeatable).")] = None,
    unit: Annotated[Optional[str], typer.Option(help="Privacy unit: image (default), column:NAME "
                                                "(metadata.jsonl) or folder:K.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Name of PRIVATE in the budget ledger "
                                                   "(default: a random id kept in "
                                                   "PRIVATE/.privsynth-dataset).")] = None,
    ledger: Annotated[Optional[Path], typer.Option(help="Budget ledger folder (default "
                                                   "$PRIVSYNTH_LEDGER or ~/.local/share/"
                                                   "privsynth/ledger).")] = None,
    device: Annotated[Optional[str], typer.Option(help="Torch device for training: cpu, cuda, "
                                                  "cuda:1 (overrides run.device).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse (exit 3) if any entry of PRIVATE "
                                         "would be rejected; checked before any budget is spent.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Spend the privacy budget once: train a generator on PRIVATE and write a run folder.
    The spend is recorded in PRIVATE's budget ledger; a fit past its limit is refused."""
    from privsynth import distributed
    from privsynth import recipe as recipes
    from privsynth import run

    if resume is not None:
        given = [name for name, value in (("PRIVATE", private), ("--out", out), ("--public", public),
                                          ("--method", method), ("--epsilon", epsilon),
                                          ("--delta", delta), ("--recipe", recipe), ("--set", set_),
                                          ("--unit", unit), ("--dataset", dataset),
                                          ("--ledger", ledger), ("--device", device)) if value]
        if given:
            raise UsageError(f"--resume takes the recorded inputs; drop {', '.join(given)}")
    elif private is None or out is None:
        raise UsageError("fit needs PRIVATE and --out (or --resume RUN)")
    else:
        raw = recipes.apply_overrides(recipes.read(recipe), set_ or [])
        if method is not None:
            raw["method"] = method
        if device is not None:
            raw.setdefault("run", {})["device"] = device
        resolved = recipes.with_privacy(recipes.resolve(raw), epsilon=epsilon, delta=delta, unit=unit)
    with distributed.session():
        bars = _Bars(sys.stderr.isatty() and not json_out and distributed.is_main())
        with bars.progress, _resume_hint(resume or out):
            result = (run.resume(resume, progress=bars) if resume is not None else
                      run.fit(private, public, resolved, out, progress=bars, dataset=dataset,
                              ledger_dir=ledger, strict=strict))
    if result is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    cert = result.certificate
    for path, why in result.rejects[:10]:
        err.print(f"[yellow]skipped[/] {path}: {why}")
    if len(result.rejects) > 10:
        err.print(f"[yellow]... and {len(result.rejects) - 10} more skipped files[/]")
    summary = {"run": str(result.run), "certificate": str(result.run / "certificate.json"),
               "epsilon": cert["epsilon"]["spent"], "delta": cert["delta"],
               "accountant": cert["accountant"], "rejected_files": len(result.rejects)}
    _emit(summary, json_out, f"run written to {result.run}\n"
          f"  spent epsilon={summary['epsilon']:.4g} (target {cert['epsilon']['target']:g}), "
          f"delta={summary['delta']:.3g} [{summary['accountant']}]\n"
          f"  certificate: {summary['certificate']}")


@app.command(epilog="Examples:\n\n  privsynth sample runs/demo -n 1000 --out synth/demo\n\n"
                    "  privsynth sample runs/demo -n 60000 --out synth/big --seed 3 --balanced")
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `privsynth fit`.")],
    n: Annotated[int, typer.Option("-n", help="Number of images to write.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New dataset folder (never overwritten).")],
    seed: Annotated[int, typer.Option(help="Seed for latents and labels (public randomness).")] = 0,
    balanced: Annotated[bool, typer.Option(help="Equal images per class instead of the noisy "
                                           "class proportions.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Torch device for sampling (default: the "
                                                  "run's device if present, else cpu).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write N synthetic images from a fitted run (no privacy cost): PNGs in class folders,
    metadata.jsonl, a sha256 manifest and a copy of the certificate."""
    from privsynth import distributed, run

    with distributed.session():
        path = run.sample(run_dir, n, out, seed=seed, balanced=balanced, device=device)
    if path is None:  # a torchrun process other than rank 0: rank 0 writes and reports
        return
    _emit({"dataset": str(path), "images": n, "manifest": str(path / "MANIFEST.sha256")},
          json_out, f"{n} synthetic images written to {path}")


EXAMPLES_EVALUATE = """
Examples:\n
  privsynth evaluate synth/demo --real assets/demo/private --test assets/demo/real-test --out reports/demo\n
  privsynth evaluate synth/eps1 synth/eps3 synth/eps10 --real private/ --test test/ --out reports/sweep\n
  privsynth evaluate synth/demo --real test/ --feature-space inception --inception-weights ~/weights/ --out reports/inc
"""


@app.command(epilog=EXAMPLES_EVALUATE)
def evaluate(
    synthetic: Annotated[list[Path], typer.Argument(help="Synthetic dataset folder(s) (or any image "
                                                    "folders); several make an epsilon sweep.")],
    real: Annotated[Path, typer.Option(help="Real images: the private training folder (memorisation "
                                       "is measured against it) or another real reference set.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (report.json, report.html).")],
    test: Annotated[Optional[Path], typer.Option(help="Real images held out from training: the "
                                                 "classifier's test set and the memorisation "
                                                 "baseline.")] = None,
    val: Annotated[Optional[Path], typer.Option(help="Real images held out from training to choose "
                                                "the classifier's epoch (default: a 10% synthetic "
                                                "split). Never the test set.")] = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours for precision/recall.")] = 3,
    classifier_epochs: Annotated[int, typer.Option(help="Epochs of the utility classifier "
                                                   "(0: no classifier).")] = 10,
    feature_space: Annotated[str, typer.Option(help="efficientnet-lite0 (offline) or inception "
                                               "(clean-fid's InceptionV3).")] = "efficientnet-lite0",
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="Folder or file holding inception-2015-12-05.pt (for --feature-space inception).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache, keyed by file contents "
                                                      "(default OUT/cache). Holds statistics of the "
                                                      "real images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass of the feature "
                                            "network (under torchrun, also the unit of work "
                                            "shared among the processes).")] = 100,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Compare synthetic dataset(s) with real images: FID, KID, precision/recall, downstream
    accuracy and memorisation, in report.json and a self-contained report.html. Numbers
    computed on real images are not covered by the DP guarantee: the report is for the owner."""
    from privsynth import distributed
    from privsynth import evaluate as evaluation
    from privsynth.downstream import ClassifierConfig

    with distributed.session():
        bars = _Bars(sys.stderr.isatty() and not json_out and distributed.is_main())
        with bars.progress:
            report = evaluation.evaluate(
                synthetic, real, out, test=test, val=val, k=k, feature_space=feature_space,
                classifier=ClassifierConfig(epochs=classifier_epochs) if classifier_epochs > 0 else None,
                inception_weights=inception_weights, cache_dir=cache_dir, overwrite=overwrite,
                batch_size=batch_size, progress=bars)
    if report is None:  # a torchrun process other than rank 0: rank 0 writes and reports
        return
    _emit(report, json_out, _evaluation_summary(report, Path(out)))


def _evaluation_summary(report: dict, out: Path) -> str:
    """`evaluate`'s human-readable summary: one line per run."""
    lines = [f"feature space: {report['feature_space']['name']} (not DP: computed on real images)"]
    for run in report["runs"]:
        eps = f"epsilon={run['privacy']['epsilon']:.4g} " if run.get("privacy") else ""
        extra = ""
        if "utility" in run:
            extra += f" accuracy={run['utility']['accuracy']:.4f}"
        if "memorisation" in run:
            extra += f" near-copies={run['memorisation']['suspicious_fraction']:.2%}"
        lines.append(f"  {run['name']}: {eps}FID={run['fid']:.4g} precision={run['precision']:.3f} "
                     f"recall={run['recall']:.3f}{extra}")
    return "\n".join(lines + [f"report: {out / 'report.html'} (and report.json)"])


@app.command(epilog="Examples:\n\n  privsynth budget\n\n  privsynth budget ./xrays --limit 8 "
                    "--delta 1e-6\n\n  privsynth budget xrays-2024 --json")
def budget(
    dataset: Annotated[Optional[str], typer.Argument(help="A private folder or a --dataset name; "
                                                     "none lists every dataset.")] = None,
    limit: Annotated[Optional[float], typer.Option(help="Set the total epsilon limit: a fit that "
                                                   "would pass it is refused.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="Delta at which the limit holds (default: "
                                                   "the smallest delta of the recorded fits).")] = None,
    remove_limit: Annotated[bool, typer.Option("--remove-limit", help="Remove the limit.")] = False,
    ledger: Annotated[Optional[Path], typer.Option(help="Ledger folder (default $PRIVSYNTH_LEDGER "
                                                   "or ~/.local/share/privsynth/ledger).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Show (or limit) what fits have spent on a private dataset, all fits composed."""
    from privsynth.privacy import ledger as ledgers

    if dataset is None:
        if limit is not None or remove_limit:
            raise typer.BadParameter("name the dataset whose limit to set", param_hint="DATASET")
        folder = ledgers.location(ledger)
        rows = [ledgers.summary(ledgers.Ledger(folder, key)) for key in ledgers.datasets(folder)]
        _emit({"ledger": str(folder), "datasets": rows}, json_out, "\n".join(
            [f"ledger: {folder}"] + ([_budget_line(r) for r in rows] or ["  (no fits recorded)"])))
        return
    book = ledgers.open_ledger(dataset, ledger, create=limit is not None)
    if limit is not None or remove_limit:
        book.set_limit(None if remove_limit else limit, delta)
    row = ledgers.summary(book)
    fits = [f"  {f['created']}  {f['method']}  epsilon={f['epsilon']:.4g} delta={f['delta']:.3g}"
            f"  {f['status']}  {f['run']}" for f in row["fits"]]
    _emit(row, json_out, "\n".join([_budget_line(row), *fits]))


def _budget_line(row: dict) -> str:
    spent, limit = row["spent"], row["limit"]
    at = f" (delta {spent['delta']:.3g})" if spent["delta"] else ""
    cap = f" of limit {limit['epsilon']:g} (delta {limit['delta']:.3g})" if limit else ", no limit set"
    return (f"{row['dataset']}: {len(row['fits'])} fit(s), epsilon spent {spent['epsilon']:.4g}"
            f"{at}{cap}; unit: {row['unit'] or '-'}")


@app.command(epilog="Examples:\n\n  privsynth inspect ./xrays\n\n"
                    "  privsynth inspect ./xrays --json | jq .rejects")
def inspect(
    private: Annotated[Path, typer.Argument(help="Image folder, read as `fit` would read it.")],
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 if any entry is rejected.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Preview what `fit` would read; spends no budget and writes nothing.

    Counts per class, formats, modes, sizes, exact duplicates and every rejected entry with its
    reason. The exact counts are for the data owner: they are not covered by the DP guarantee."""
    from privsynth import data
    from privsynth.errors import DataError

    result = data.survey(data.scan(private))
    _emit(result, json_out, _describe(result))
    if strict and result["rejected"]:
        raise DataError(f"--strict: {result['rejected']} of {result['seen']} entries rejected")


def _describe(found: dict) -> str:
    """`inspect`'s human-readable summary."""
    def tally(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"

    dup = found["duplicates"]
    lines = [f"{found['root']}: {found['layout']}, {found['seen']} entries seen: "
             f"{found['accepted']} accepted, {found['rejected']} rejected",
             f"  classes ({len(found['classes'])}): {tally(found['classes'])}",
             f"  formats: {tally(found['formats'])}", f"  modes: {tally(found['modes'])}",
             f"  sizes: {tally(dict(list(found['sizes'].items())[:5]))}"
             + (f" (+{len(found['sizes']) - 5} more)" if len(found["sizes"]) > 5 else ""),
             f"  exact duplicates: {dup['groups']} groups, {dup['extra_copies']} extra copies (kept)"]
    lines += [f"  note: {note}" for note in found["notes"]]
    lines += [f"  rejected {r['file']}: {r['reason']}" for r in found["rejects"]]
    return "\n".join(lines)


@app.command(epilog="Examples:\n\n  privsynth verify runs/demo\n\n  privsynth verify synth/demo")
def verify(
    path: Annotated[Path, typer.Argument(help="A run folder, a dataset folder or a certificate.json.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Re-check a certificate: recompute epsilon from its mechanisms and, for a dataset folder,
    every file against MANIFEST.sha256. Exits 6 on any mismatch."""
    from privsynth import certificate, publish

    cert = certificate.load(path)
    problems = certificate.check(cert)
    if Path(path).is_dir() and (Path(path) / "MANIFEST.sha256").is_file():
        problems += publish.verify_manifest(Path(path))
    result = {"path": str(path), "ok": not problems, "problems": problems,
              "epsilon_recomputed": certificate.recompute(cert), "delta": cert.get("delta")}
    if problems:
        _emit(result, json_out, "\n".join(f"FAILED: {p}" for p in problems))
        raise VerificationError(f"{len(problems)} problem(s) in {path}")
    _emit(result, json_out, f"OK: epsilon recomputes to {result['epsilon_recomputed']:.4g} "
          f"(delta {cert['delta']:.3g}); " + ("manifest matches" if (Path(path) / "MANIFEST.sha256")
                                              .is_file() else "no manifest here"))


def main() -> None:
    """Console-script entry point (exits with the documented codes)."""
    app()
