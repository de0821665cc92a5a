"""The `privsynth` command line: fit, sample, evaluate, verify, inspect, audit.

Results go to stdout (a JSON document with --json), progress and messages to stderr. Library
errors become exit codes here and only here:
0 ok, 1 unexpected error, 2 usage (flags, recipe), 3 data (unreadable input folder),
4 budget (the privacy budget cannot pay), 5 missing resource (weights file),
6 verification failed, 130 interrupted (Ctrl-C), 141 stdout closed early (`| head`; quiet),
143 terminated (SIGTERM, during fit and resume).
Every error is one line on stderr, click's usage errors included. No ANSI codes on stderr unless
it is a terminal and NO_COLOR is unset; progress is drawn as bars on a terminal and written as
plain, rate-limited lines otherwise (a piped or nohup fit still says where it is).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from privsynth import __version__
from privsynth.errors import PrivsynthError, UsageError, VerificationError
from privsynth.generators import METHODS

# click's exceptions, found through typer's public BadParameter: typer vendors click from 0.29 on
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a fit: handled like Ctrl-C (the resume hint), exit 143."""


def _usage_error(exc: Exception) -> typer.Exit:
    """click's own error (bad flag, missing argument) as one line on stderr; the exit to raise."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if not _rank_tag():  # under torchrun every process parses the same flags: rank 0 says it
        err.print("[red]error:[/]", escape(message + hint), highlight=False)
    return typer.Exit(UsageError.exit_code)


def _is_click_error(exc: BaseException) -> bool:
    """A click error to print as one line (not the help that `privsynth` alone prints)."""
    return isinstance(exc, _ClickException) and type(exc).__name__ != "NoArgsIsHelpError"


def _readable(params: list) -> list:
    """Help without Python types: typer shows `<bool>` after flags and `<path>`, `<list[Path]>`
    after arguments, whose metavar (PRIVATE, RUN) already says what they are."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
            param.display_type_rich = lambda ctx: None  # typer >= 0.29's type column
    return params


class _Command(TyperCommand):
    """A subcommand whose help shows no Python types."""

    def get_params(self, ctx: typer.Context) -> list:
        return _readable(super().get_params(ctx))


class _Group(TyperGroup):
    """Maps library errors to exit codes: the only place that decides how privsynth exits."""

    def get_params(self, ctx: typer.Context) -> list:
        return _readable(super().get_params(ctx))

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _ClickException as exc:  # `privsynth --bogus`
            if not _is_click_error(exc):
                raise
            raise _usage_error(exc) from None

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name == "fit" and cmd is not None:
            alias = _fit_resume_alias(cmd, ctx, rest)
            if alias is not None:  # `fit --resume RUN`: the old spelling of `resume RUN`
                return "resume", self.get_command(ctx, "resume"), alias
        return name, cmd, rest

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):  # --help, --version, Ctrl-C at a prompt
            raise
        except _ClickException as exc:  # a bad flag or value: one line, like every other error
            if not _is_click_error(exc):
                raise
            raise _usage_error(exc) from None
        except PrivsynthError as exc:
            if getattr(exc, "echo_of_rank", None) is None:  # torchrun: the rank it came from says it
                err.print(f"[red]error{_rank_tag()}:[/]", escape(str(exc)), highlight=False)
            ctx.exit(exc.exit_code)
        except _Terminated:
            err.print("terminated")
            ctx.exit(143)
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
         "(weights file), 6 verification failed, 130 interrupted, 141 stdout closed early, "
         "143 terminated (SIGTERM).")
_NO_COLOR = bool(os.environ.get("NO_COLOR"))  # https://no-color.org: and no cursor codes either
err = Console(stderr=True, soft_wrap=True, no_color=_NO_COLOR or None,
              force_terminal=False if _NO_COLOR else None)

EXAMPLES_FIT = """
Examples:\n
  privsynth fit assets/demo/private --public assets/demo/public --method dp-mepf --epsilon 10 --out runs/demo\n
  privsynth fit ./xrays --method dp-mepf --epsilon 1 --set dpmepf.steps=500 --out runs/x1\n
  privsynth fit assets/demo/private --public assets/demo/public --method privimage --epsilon 10 --recipe recipes/demo-privimage.toml --out runs/pi

  privsynth resume runs/x1   (finish a fit cut short by Ctrl-C, SIGTERM, a crash or kill -9)

  torchrun --standalone --nproc-per-node 4 -m privsynth fit ... --method privimage --device cuda   (data-parallel, one GPU per process: docs/distributed.md)
"""


class _Bars:
    """Progress on stderr, one bar or line per task description prefix (the part before " (").

    On a terminal: rich progress bars. Elsewhere (`lines`: piped, nohup, a log file): plain lines,
    at most one per stage every `every` seconds, plus each stage's last line."""

    def __init__(self, enabled: bool, *, lines: bool = False, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=err, disable=not enabled, transient=False)
        self.tasks: dict[str, int] = {}
        self.lines = lines and not enabled
        self.every, self.clock = every, clock
        self.started: dict[str, float] = {}
        self.shown: dict[str, tuple[float, int, int]] = {}  # stage -> last (when, done, total)

    def __call__(self, what: str, done: int, total: int) -> None:
        key = what.split(" (")[0]
        if self.lines:
            self._line(key, what, done, total)
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(what, total=total)
        self.progress.update(self.tasks[key], completed=done, total=total, description=what)

    def _line(self, key: str, what: str, done: int, total: int) -> None:
        now = self.clock()
        start = self.started.setdefault(key, now)
        last = self.shown.get(key)
        if last is not None and (last[1:] == (done, total)  # nothing new
                                 or now - last[0] < self.every and done < total):
            return
        self.shown[key] = (now, done, total)
        elapsed = int(now - start)
        err.print(escape(f"{what}: {done}/{total} "
                         f"[{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}]"),
                  highlight=False)


def _progress(json_out: bool) -> _Bars:
    """Bars on a terminal (not with --json), plain lines when stderr is not one; rank 0 only."""
    from privsynth import distributed

    main, tty = distributed.is_main(), sys.stderr.isatty()
    return _Bars(tty and not json_out and main, lines=not tty and main)


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
                             f"{run.work_folder(out)}; finish it with: privsynth resume {out}"))
        raise


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (kill, a scheduler's stop, torchrun stopping its workers) raises `_Terminated`,
    so the fit stops as on Ctrl-C: its ledger entries are settled and the resume hint printed.
    A second SIGTERM gets the previous handler (by default: exit at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise _Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit_and_report(call: Callable[[_Bars], object], out: Path, json_out: bool) -> None:
    """Run a fit (`call(progress)`: fresh or resumed) and print what it wrote and spent."""
    from privsynth import distributed, manifest

    with distributed.session():
        bars = _progress(json_out)
        with _sigterm_interrupts(), bars.progress, _resume_hint(out):
            result = call(bars)
    if result is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    cert = result.certificate
    for path, why in result.rejects[:10]:
        err.print(f"[yellow]skipped[/] {path}: {why}")
    if len(result.rejects) > 10:
        err.print(f"[yellow]... and {len(result.rejects) - 10} more skipped files[/]")
    summary = {"run": str(result.run), "certificate": str(result.run / "certificate.json"),
               "epsilon": cert["epsilon"]["spent"], "delta": cert["delta"],
               "accountant": cert["accountant"], "rejected_files": len(result.rejects),
               "owner_only": str(result.run / manifest.OWNER)}
    chosen = ""
    if result.chosen is not None:  # the defaults layer ran (not for a library-given Recipe)
        from privsynth import defaults

        summary["chosen"] = result.chosen
        chosen = f"  {defaults.summary(result.chosen)}\n"
    _emit(summary, json_out, f"run written to {result.run}\n"
          f"  spent epsilon={summary['epsilon']:.4g} (target {cert['epsilon']['target']:g}), "
          f"delta={summary['delta']:.3g} [{summary['accountant']}]\n{chosen}"
          f"  certificate: {summary['certificate']}\n"
          f"  publishable: {manifest.PUBLISHABLE}; owner-only (private file names, do not "
          f"publish): {summary['owner_only']}")


def _method(value: Optional[str]) -> Optional[str]:
    """--method: one of METHODS, with the closest one suggested."""
    if value is None or value in METHODS:
        return value
    close = difflib.get_close_matches(value, METHODS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(METHODS)}{hint}")


def _fit_resume_alias(cmd, ctx: typer.Context, args: list[str]) -> Optional[list[str]]:
    """`resume`'s arguments when `fit` was called as `fit --resume RUN [--json]`, else None.

    The flags are parsed (not processed) as `fit` would parse them; any other input is refused,
    since a resumed fit takes the inputs its first attempt recorded."""
    probe = cmd.context_class(cmd, parent=ctx, info_name="fit", resilient_parsing=True)
    try:
        opts, extra, _ = cmd.make_parser(probe).parse_args(args=list(args))
    except _ClickException:
        return None  # `fit` itself reports the bad flag
    if opts.get("resume") is None or opts.get("help"):
        return None
    given = [(next((o for o in p.opts if o.startswith("--")), p.opts[0])
              if p.param_type_name == "option" else (p.metavar or p.name.upper()))
             for p in cmd.params if p.name not in ("resume", "json_out")
             and opts.get(p.name) not in (None, (), [])] + [str(a) for a in extra]
    if given:
        raise UsageError(f"--resume takes the recorded inputs; drop {', '.join(given)} "
                         "(`privsynth resume RUN` is the same command)")
    return (["--json"] if opts.get("json_out") else []) + ["--", str(opts["resume"])]


@app.command(cls=_Command, epilog=EXAMPLES_FIT)
def fit(
    private: Annotated[Path, typer.Argument(
        metavar="PRIVATE", show_default=False,
        help="Private image folder: ImageFolder (one sub-folder per class), flat (unlabelled) or "
             "with metadata.jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="RUN", show_default=False,
                                      help="New run folder to write (never overwritten).")],
    method: Annotated[Optional[str], typer.Option(
        metavar="[" + "|".join(METHODS) + "]", callback=_method,
        help="The generator (or set `method` in the recipe).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(
        metavar="EPSILON", help="Target epsilon for the whole run (> 0). Required, unless the "
                                "recipe sets privacy.epsilon.")] = None,
    public: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Public labelled image "
                                                   "folder: privimage's query and pretraining data "
                                                   "(dp-mepf only records it; its public side is "
                                                   "the encoder).")] = None,
    delta: Annotated[Optional[float], typer.Option(metavar="DELTA", help="Target delta (default "
                                                   "1/(N ln N)).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(metavar="FILE", help="TOML recipe file (see "
                                                   "recipes/).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override "
                                                      "a recipe key: section.key=value "
                                                      "(repeatable).")] = None,
    unit: Annotated[Optional[str], typer.Option(metavar="UNIT", help="Privacy unit: image "
                                                "(default), column:NAME (metadata.jsonl) or "
                                                "folder:K.")] = None,
    dataset: Annotated[Optional[str], typer.Option(metavar="NAME", help="Name of PRIVATE in the "
                                                   "budget ledger (default: a random id kept in "
                                                   "PRIVATE/.privsynth-dataset).")] = None,
    ledger: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Budget ledger folder "
                                                   "(default $PRIVSYNTH_LEDGER or ~/.local/share/"
                                                   "privsynth/ledger).")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help="Torch device for "
                                                  "training: cpu, cuda, cuda:1 (overrides "
                                                  "run.device).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse (exit 3) if any entry of PRIVATE "
                                         "would be rejected; checked before any budget is spent.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        metavar="RUN", help="Old spelling of `privsynth resume RUN` (kept for scripts); takes no "
                            "other input.")] = None,
) -> None:
    """Spend the privacy budget once: train a generator on PRIVATE and write a run folder.
    The spend is recorded in PRIVATE's budget ledger; a fit past its limit is refused.

    The whole request (method, epsilon, recipe, --out) is checked before anything is written."""
    from privsynth import recipe as recipes
    from privsynth import run
    from privsynth.privacy import mechanisms

    mechanisms.check_noise_on()  # the audit's no-noise control never reaches a real fit
    if resume is not None:  # `fit --resume RUN` is routed to `resume` before fit parses its flags
        raise UsageError("use `privsynth resume RUN`")
    raw = recipes.apply_overrides(recipes.read(recipe), set_ or [])
    if method is not None:
        raw["method"] = method
    if device is not None:
        raw.setdefault("run", {})["device"] = device
    if epsilon is not None and not epsilon > 0:
        raise UsageError(f"--epsilon must be > 0, got {epsilon:g}")
    given = {k: v for k, v in (("epsilon", epsilon), ("delta", delta), ("unit", unit)) if v is not None}
    if given:  # the flags beat the recipe, as --set does
        raw["privacy"] = {**raw.get("privacy", {}), **given}
    resolved = recipes.resolve(raw)  # checked here; the defaults for the data complete it in fit
    if not resolved.privacy.epsilon > 0:
        raise UsageError("--epsilon is required (or set privacy.epsilon in the recipe)"
                         if "epsilon" not in raw.get("privacy", {}) else
                         f"privacy.epsilon must be > 0, got {resolved.privacy.epsilon:g}")
    _fit_and_report(lambda bars: run.fit(private, public, raw, out, progress=bars,
                                         dataset=dataset, ledger_dir=ledger, strict=strict),
                    out, json_out)


@app.command("resume", cls=_Command,
             epilog="Examples:\n\n  privsynth resume runs/x1\n\n  privsynth resume runs/x1 --json")
def resume_(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN", show_default=False,
        help="The run folder an interrupted fit was writing (its sibling .RUN.work folder holds "
             "the recorded spend and the last saved state).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Finish a fit cut short by Ctrl-C, SIGTERM, a crash or kill -9 (spends nothing more).

    It takes the inputs the fit recorded and reuses its recorded charges: the certificate equals
    the one an uninterrupted fit would have written. `fit --resume RUN` is the same command."""
    from privsynth import run
    from privsynth.privacy import mechanisms

    mechanisms.check_noise_on()  # as in fit
    _fit_and_report(lambda bars: run.resume(run_dir, progress=bars), run_dir, json_out)


@app.command(cls=_Command,
             epilog="Examples:\n\n  privsynth sample runs/demo -n 1000 --out synth/demo\n\n"
                    "  privsynth sample runs/demo --count 60000 --out synth/big --seed 3 "
                    "--balanced")
def sample(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", show_default=False,
                                            help="A run folder written by `privsynth fit`.")],
    n: Annotated[int, typer.Option("--count", "-n", metavar="N", show_default=False,
                                   help="Number of images to write.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FOLDER", show_default=False,
                                      help="New dataset folder (see --overwrite).")],
    seed: Annotated[int, typer.Option(metavar="SEED", help="Seed for latents and labels (public "
                                                         "randomness).")] = 0,
    balanced: Annotated[bool, typer.Option(help="Equal images per class instead of the noisy "
                                           "class proportions.")] = False,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help="Torch device for "
                                                  "sampling (default: the run's device if "
                                                  "present, else cpu).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FOLDER if it is a "
                                            "dataset folder written by `sample` (once the new "
                                            "one is complete); other folders are refused.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write N synthetic images from a fitted run (no privacy cost): PNGs in class folders,
    metadata.jsonl, a sha256 manifest and a copy of the certificate."""
    from privsynth import distributed, run

    with distributed.session():
        path = run.sample(run_dir, n, out, seed=seed, balanced=balanced, device=device,
                          overwrite=overwrite)
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


@app.command(cls=_Command, epilog=EXAMPLES_EVALUATE)
def evaluate(
    synthetic: Annotated[list[Path], typer.Argument(
        metavar="SYNTHETIC", show_default=False,
        help="Synthetic dataset folder(s) (or any image folders); several make an epsilon sweep.")],
    real: Annotated[Path, typer.Option(
        metavar="FOLDER", show_default=False,
        help="Real images: the private training folder (memorisation is measured against it) or "
             "another real reference set.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FOLDER", show_default=False,
                                      help="Report folder (report.json, report.html).")],
    test: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Real images held out from "
                                                 "training: the classifier's test set and the "
                                                 "memorisation baseline.")] = None,
    val: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Real images held out from "
                                                "training to choose the classifier's epoch "
                                                "(default: a 10% synthetic split). Never the test "
                                                "set.")] = None,
    k: Annotated[int, typer.Option("--k", metavar="K", help="Neighbours for "
                                                            "precision/recall.")] = 3,
    classifier_epochs: Annotated[int, typer.Option(metavar="EPOCHS", help="Epochs of the utility "
                                                   "classifier (0: no classifier, no label "
                                                   "agreement).")] = 10,
    feature_space: Annotated[str, typer.Option(metavar="SPACE", help="efficientnet-lite0 (offline) "
                                               "or inception (clean-fid's "
                                               "InceptionV3).")] = "efficientnet-lite0",
    inception_weights: Annotated[Optional[Path], typer.Option(
        metavar="PATH", help="Folder or file holding inception-2015-12-05.pt (for --feature-space "
                             "inception).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Feature cache, keyed "
                                                      "by file contents (default OUT/cache). Holds "
                                                      "statistics of the real images.")] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per forward pass of the "
                                            "feature network (under torchrun, also the unit of "
                                            "work shared among the processes).")] = 100,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help="Torch device for the "
                                                  "feature network: cpu (default), cuda, cuda:1 "
                                                  "(under torchrun, cuda is each process's own "
                                                  "GPU). The utility classifier trains on the "
                                                  "CPU.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Compare synthetic dataset(s) with real images: FID, KID, precision/recall, downstream
    accuracy, label agreement and memorisation, in report.json and a self-contained report.html.
    Numbers computed on real images are not covered by the DP guarantee: the report is for the
    owner."""
    from privsynth import distributed, run
    from privsynth import evaluate as evaluation
    from privsynth.downstream import ClassifierConfig

    with distributed.session():
        # a missing CUDA device is refused here, before any image is read
        torch_device = distributed.device(run._device(device or "cpu", explicit=True))
        bars = _progress(json_out)
        with bars.progress:
            report = evaluation.evaluate(
                synthetic, real, out, test=test, val=val, k=k, feature_space=feature_space,
                classifier=ClassifierConfig(epochs=classifier_epochs) if classifier_epochs > 0 else None,
                inception_weights=inception_weights, cache_dir=cache_dir, overwrite=overwrite,
                batch_size=batch_size, device=torch_device, progress=bars)
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
        if "label_agreement" in run:
            extra += f" label-agreement={run['label_agreement']['agreement']:.4f}"
        if "memorisation" in run:
            extra += f" near-copies={run['memorisation']['suspicious_fraction']:.2%}"
        lines.append(f"  {run['name']}: {eps}FID={run['fid']:.4g} precision={run['precision']:.3f} "
                     f"recall={run['recall']:.3f}{extra}")
    return "\n".join(lines + [f"report: {out / 'report.html'} (and report.json)"])


@app.command(cls=_Command,
             epilog="Examples:\n\n  privsynth budget\n\n  privsynth budget ./xrays --limit 8 "
                    "--delta 1e-6\n\n  privsynth budget xrays-2024 --json\n\n"
                    "  privsynth budget xrays-2025 --create --limit 4 --delta 1e-6   (a --dataset "
                    "name no fit has used yet)")
def budget(
    dataset: Annotated[Optional[str], typer.Argument(metavar="DATASET", show_default=False,
                                                     help="A private folder or a --dataset name; "
                                                     "none lists every dataset.")] = None,
    limit: Annotated[Optional[float], typer.Option(metavar="EPSILON", help="Set the total epsilon "
                                                   "limit: a fit that would pass it is refused. "
                                                   "Not below what is already spent.")] = None,
    delta: Annotated[Optional[float], typer.Option(metavar="DELTA", help="Delta at which the limit "
                                                   "holds (default: the smallest delta of the "
                                                   "recorded fits).")] = None,
    remove_limit: Annotated[bool, typer.Option("--remove-limit", help="Remove the limit.")] = False,
    create: Annotated[bool, typer.Option("--create", help="Start the ledger of a dataset name that "
                                         "no fit has used yet (to set its --limit before its "
                                         "first fit).")] = False,
    ledger: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Ledger folder (default "
                                                   "$PRIVSYNTH_LEDGER or ~/.local/share/privsynth/"
                                                   "ledger).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Show (or limit) what fits have spent on a private dataset, all fits composed."""
    from privsynth.privacy import ledger as ledgers

    if dataset is None:
        if limit is not None or remove_limit or create:
            raise typer.BadParameter("name the dataset whose limit to set", param_hint="DATASET")
        folder = ledgers.location(ledger)
        rows = [ledgers.summary(ledgers.Ledger(folder, key)) for key in ledgers.datasets(folder)]
        _emit({"ledger": str(folder), "datasets": rows}, json_out, "\n".join(
            [f"ledger: {folder}"] + ([_budget_line(r) for r in rows] or ["  (no fits recorded)"])))
        return
    if create and limit is None:
        raise UsageError("--create starts a ledger to set its limit: pass --limit too")
    book = ledgers.open_ledger(dataset, ledger, create=limit is not None, new_name=create)
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


@app.command(cls=_Command, epilog="Examples:\n\n  privsynth inspect ./xrays\n\n"
                                  "  privsynth inspect ./xrays --json | jq .rejects")
def inspect(
    private: Annotated[Path, typer.Argument(metavar="PRIVATE", show_default=False,
                                            help="Image folder, read as `fit` would read it.")],
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


@app.command(cls=_Command,
             epilog="Examples:\n\n  privsynth verify runs/demo\n\n  privsynth verify synth/demo")
def verify(
    path: Annotated[Path, typer.Argument(metavar="PATH", show_default=False,
                                         help="A run folder, a dataset folder or a "
                                              "certificate.json.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Re-check a certificate: recompute epsilon from its mechanisms and, for a dataset folder
    or a run folder, every file (a run: its model weights, recipe and certificate) against
    MANIFEST.sha256. Exits 6 on any mismatch."""
    from privsynth import certificate, manifest

    cert = certificate.load(path)
    problems = certificate.check(cert)
    if Path(path).is_dir() and (manifest.is_run(path) or (Path(path) / manifest.MANIFEST).is_file()):
        problems += manifest.check(Path(path))
    result = {"path": str(path), "ok": not problems, "problems": problems,
              "epsilon_recomputed": certificate.recompute(cert), "delta": cert.get("delta")}
    if problems:
        _emit(result, json_out, "\n".join(f"FAILED: {p}" for p in problems))
        raise VerificationError(f"{len(problems)} problem(s) in {path}")
    _emit(result, json_out, f"OK: epsilon recomputes to {result['epsilon_recomputed']:.4g} "
          f"(delta {cert['delta']:.3g}); " + (manifest.state(Path(path)) if Path(path).is_dir()
                                              else "no manifest here"))


EXAMPLES_AUDIT = """
Examples:\n
  privsynth audit assets/demo/private --method dp-mepf --epsilon 1 --canaries 200 --out audits/demo\n
  privsynth audit assets/demo/private --method dp-mepf --epsilon 1 --control no-noise --json   (the positive control: its bound must exceed 1)
"""


@app.command("audit", cls=_Command, epilog=EXAMPLES_AUDIT)
def audit_(
    private: Annotated[Path, typer.Argument(metavar="PRIVATE", show_default=False,
                                            help="Private image folder (ImageFolder or flat), "
                                                 "read as `fit` reads it; never written to.")],
    method: Annotated[Optional[str], typer.Option(
        metavar="[" + "|".join(METHODS) + "]", callback=_method,
        help="The generator (or set `method` in the recipe).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(
        metavar="EPSILON", help="Target epsilon of the audited fit (> 0).")] = None,
    canaries: Annotated[int, typer.Option(metavar="K", help="Canary images, each included with "
                                          "probability 1/2 (more canaries: a higher possible "
                                          "bound).")] = 64,
    public: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Public labelled image "
                                                   "folder (privimage), as for fit.")] = None,
    delta: Annotated[Optional[float], typer.Option(metavar="DELTA", help="Target delta (default "
                                                   "1/(N ln N) of PRIVATE).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(metavar="FILE", help="TOML recipe file, as "
                                                   "for fit.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override "
                                                      "a recipe key (repeatable).")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help="Torch device: cpu, "
                                                  "cuda (overrides run.device).")] = None,
    control: Annotated[str, typer.Option(metavar="[none|no-noise]", help="no-noise: the positive "
                                         "control, the same fit with every noise draw zero (its "
                                         "certificate does not hold).")] = "none",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FOLDER", help="New folder "
                                                "for AUDIT.md, audit.json and scores.svg.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Measure a lower bound on epsilon from one real fit with canaries (Steinke, Nasr and
    Jagielski 2023), at 95 % confidence: a bug detector, not a proof (docs/audit.md).

    The fit runs as `fit` would on PRIVATE plus the included canaries; its run is discarded and
    its spend is not recorded in PRIVATE's ledger. Exits 6 when the bound exceeds the certified
    epsilon."""
    from privsynth import audit as audits
    from privsynth import recipe as recipes
    from privsynth.audit.report import summary

    raw = recipes.apply_overrides(recipes.read(recipe), set_ or [])
    if method is not None:
        raw["method"] = method
    if device is not None:
        raw.setdefault("run", {})["device"] = device
    if epsilon is not None and not epsilon > 0:
        raise UsageError(f"--epsilon must be > 0, got {epsilon:g}")
    given = {k: v for k, v in (("epsilon", epsilon), ("delta", delta)) if v is not None}
    if given:  # as in fit: the flags beat the recipe
        raw["privacy"] = {**raw.get("privacy", {}), **given}
    if not recipes.resolve(raw).privacy.epsilon > 0:  # checked here, completed in the fit
        raise UsageError("--epsilon is required (or set privacy.epsilon in the recipe)")
    bars = _progress(json_out)
    with bars.progress:
        result = audits.audit(private, raw, public=public, canaries=canaries,
                              control=control, out=out, progress=bars)
    g = result["guesses"] or {}
    _emit(summary(result) | ({"report": str(out / "AUDIT.md")} if out else {}), json_out,
          f"audit of {result['method']}{' (no-noise control)' if control == 'no-noise' else ''}: "
          f"certified epsilon={result['certified_epsilon']:.4g} (delta {result['delta']:.3g}), "
          f"empirical lower bound {result['epsilon_lower_bound']:.4g} at 95% confidence "
          f"(ceiling {result['ceiling']:.3g}) [{result['verdict']}]\n"
          f"  guesses: {g.get('k_in', 0)} in ({g.get('correct_in', 0)} right), {g.get('k_out', 0)} "
          f"out ({g.get('correct_out', 0)} right); score: {result['score']}; "
          f"{result['canaries']} canaries, {result['included']} included; "
          f"fit {result['fit_seconds']:.0f} s"
          + (f"\n  report: {out / 'AUDIT.md'}" if out else ""))
    if result["verdict"] == "VIOLATION":
        raise VerificationError(f"the lower bound {result['epsilon_lower_bound']:.4g} exceeds the "
                                f"certified epsilon {result['certified_epsilon']:.4g}")


def main() -> None:
    """Console-script entry point (exits with the documented codes)."""
    app()
