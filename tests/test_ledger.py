"""The budget ledger (issue 3, item 4): per-dataset, persistent, composed through the certificate's
accountant, a user-set limit that refuses a fit before any private pixel is read, write-ahead
records that survive a failed fit, and `privsynth budget`. Tests never touch the home folder."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import PIL.Image
import PIL.ImageFile
import pytest
from typer.testing import CliRunner

from privsynth import data, run
from privsynth.cli import app
from privsynth.errors import BudgetError, UsageError
from privsynth.generators import dpmepf
from privsynth.privacy import Charge, NoiseSource, epsilon
from privsynth.privacy import ledger as ledgers
from privsynth.recipe import resolve

runner = CliRunner()
TINY = {"method": "dp-mepf", "data": {"resolution": 16}, "features": {"input_size": 32},
        "dpmepf": {"steps": 2, "batch_per_class": 2, "width": 8}}


def _recipe(eps: float, **privacy):
    return resolve(dict(TINY, privacy=dict(epsilon=eps, **privacy)))


def _one_shot(name: str, sigma: float) -> Charge:
    return Charge(name, sigma, 1.0, 1, 1.0, "sums")


@pytest.fixture
def private(tmp_path: Path) -> Path:
    from conftest import make_folder

    return make_folder(tmp_path / "private", per_class=6)


@pytest.fixture
def book_dir(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


def _history(book: ledgers.Ledger) -> list[tuple[float, float, int]]:
    return [(c["noise_multiplier"], c["sample_rate"], c["steps"])
            for e in book.read()["entries"] for c in e["charges"]]


# ---------------------------------------------------------------------------------------------
# identity and location


def test_dataset_id_is_random_kept_with_the_folder_and_not_read_as_an_image(private, tmp_path):
    key = ledgers.dataset_key(private)
    assert key.startswith("ds-") and key == ledgers.dataset_key(private)  # stable
    record = json.loads((private / ledgers.ID_FILE).read_text())
    assert set(record) == {"id", "created", "about"}  # no hash, no file name, no count
    other = ledgers.dataset_key(_copy_without_id(private, tmp_path / "other"))
    assert other != key  # same images, no id file: a different (random) id, not a content hash
    listing = data.scan(private)  # the id file is neither an image nor a rejected entry
    assert ledgers.ID_FILE in data.OWN_FILES
    assert ledgers.ID_FILE not in {p.name for p in listing.files} | {r[0] for r in listing.skipped}
    assert ledgers.dataset_key(private, "xrays-2024") == "xrays-2024"
    with pytest.raises(UsageError, match="dataset name"):
        ledgers.dataset_key(private, "../etc/passwd")


def _copy_without_id(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ledgers.ID_FILE))
    return dst


def test_read_only_folder_without_an_id_asks_for_a_name(private, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(UsageError, match="--dataset NAME"):
        ledgers.dataset_key(private)


def test_location_option_env_and_default(tmp_path, monkeypatch):
    assert ledgers.location(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(ledgers.ENV, str(tmp_path / "env"))
    assert ledgers.location() == tmp_path / "env"
    monkeypatch.delenv(ledgers.ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert ledgers.location() == tmp_path / "xdg" / "privsynth" / "ledger"


def test_the_test_suite_never_uses_the_home_ledger():
    import os

    assert os.environ[ledgers.ENV]
    assert not Path(os.environ[ledgers.ENV]).is_relative_to(Path.home() / ".local")


# ---------------------------------------------------------------------------------------------
# composition and limits (no fit)


def test_fits_compose_through_the_accountant_not_by_adding_epsilons(book_dir):
    book = ledgers.Ledger(book_dir, "d1")
    a, b = [_one_shot("a", 2.0), _one_shot("b", 3.0)], [_one_shot("c", 2.5)]
    book.record(a, delta=1e-5, unit="image", run="r1", method="dp-mepf")
    book.record(b, delta=1e-6, unit="image", run="r2", method="dp-mepf")
    spent, at = book.spent()
    assert at == 1e-6  # no limit: the smallest delta of any fit
    assert spent == epsilon([c.history() for c in a + b], 1e-6, "prv")
    alone = [epsilon([c.history() for c in x], 1e-6, "prv") for x in (a, b)]
    assert max(alone) < spent < sum(alone)  # composed: more than either, less than the sum
    reopened = ledgers.Ledger(book_dir, "d1")  # persistent
    assert reopened.spent() == (spent, at) and len(reopened.read()["entries"]) == 2


def test_a_limit_refuses_what_would_pass_it_and_records_nothing(book_dir):
    book = ledgers.Ledger(book_dir, "d2")
    book.set_limit(4.0, 1e-5)
    first = [_one_shot("a", 1.5)]
    book.record(first, delta=1e-5, unit="image", run="r1", method="m")
    assert book.spent()[0] < 4.0
    with pytest.raises(BudgetError, match="over the owner's limit 4"):
        book.record([_one_shot("b", 1.0)], delta=1e-5, unit="image", run="r2", method="m")
    assert _history(book) == [c.history() for c in first]
    book.check([_one_shot("small", 50.0)], delta=1e-5, unit="image")  # still fits
    with pytest.raises(BudgetError, match="privacy unit"):
        book.check([_one_shot("small", 50.0)], delta=1e-5, unit="column:person")
    book.set_limit(None, None)
    book.record([_one_shot("b", 1.0)], delta=1e-5, unit="image", run="r2", method="m")


def test_an_exhausted_ledger_refuses_before_planning(book_dir):
    book = ledgers.Ledger(book_dir, "d3")
    book.set_limit(1.0, 1e-5)
    with pytest.raises(BudgetError):
        book.record([_one_shot("a", 0.5)], delta=1e-5, unit="image", run="r", method="m")
    book.set_limit(100.0, 1e-5)
    book.record([_one_shot("a", 0.5)], delta=1e-5, unit="image", run="r", method="m")
    book.set_limit(book.spent()[0], 1e-5)  # exactly used up
    with pytest.raises(BudgetError, match="limit"):
        book.check((), delta=None, unit="image")


def test_concurrent_fits_cannot_both_spend_the_last_of_a_limit(book_dir):
    book = ledgers.Ledger(book_dir, "d4")
    one = epsilon([(2.0, 1.0, 1)], 1e-5, "prv")
    book.set_limit(one * 1.2, 1e-5)  # room for one release at sigma=2, not two
    outcomes = []

    def attempt(i):
        try:
            ledgers.Ledger(book_dir, "d4").record([_one_shot(f"r{i}", 2.0)], delta=1e-5,
                                                  unit="image", run=str(i), method="m")
            outcomes.append("ok")
        except BudgetError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
    assert len(book.read()["entries"]) == 1


def test_a_damaged_ledger_refuses_to_spend(book_dir):
    book = ledgers.Ledger(book_dir, "d5")
    book.folder.mkdir(parents=True)
    book.path.write_text("{not json")
    with pytest.raises(BudgetError, match="damaged"):
        book.record([_one_shot("a", 5.0)], delta=1e-5, unit="image", run="r", method="m")


# ---------------------------------------------------------------------------------------------
# fits


def test_fit_over_the_limit_is_refused_before_any_private_pixel_is_read(private, book_dir,
                                                                       tmp_path, monkeypatch):
    first = run.fit(private, None, _recipe(3.0), tmp_path / "r1", ledger_dir=book_dir)
    book = ledgers.open_ledger(str(private), book_dir)
    assert [e["status"] for e in book.read()["entries"]] == ["completed"]
    assert book.spent()[0] == pytest.approx(first.certificate["epsilon"]["spent"], rel=1e-6)
    book.set_limit(4.0, first.certificate["delta"])

    def no_pixels(*args, **kwargs):
        raise AssertionError("a private pixel was read")

    for target in (PIL.ImageFile.ImageFile, PIL.Image.Image):
        monkeypatch.setattr(target, "load", no_pixels)
    monkeypatch.setattr(data, "load", no_pixels)
    monkeypatch.setattr(dpmepf, "load", no_pixels)
    with pytest.raises(BudgetError, match="over the owner's limit 4"):
        run.fit(private, None, _recipe(3.0), tmp_path / "r2", ledger_dir=book_dir)
    assert not (tmp_path / "r2").exists()
    assert len(book.read()["entries"]) == 1  # the refused fit recorded nothing
    monkeypatch.undo()

    # a smaller fit still fits; the two compose through the accountant
    second = run.fit(private, None, _recipe(1.0), tmp_path / "r3", ledger_dir=book_dir)
    spent, at = book.spent()
    runs = [first.certificate, second.certificate]
    history = [(m["noise_multiplier"], m["sample_rate"], m["steps"])
               for c in runs for m in c["mechanisms"]]
    assert spent == pytest.approx(epsilon(history, at), rel=1e-9) and spent <= 4.0
    assert spent < sum(c["epsilon"]["spent"] for c in runs)


def test_a_fit_that_fails_after_charging_keeps_its_spend(private, book_dir, tmp_path, monkeypatch):
    seen_at_noise = []
    real_normal = NoiseSource.normal

    def normal(self, shape, std):  # the charges must be on disk before the first noise draw
        seen_at_noise.append(_history(ledgers.open_ledger(str(private), book_dir)))
        return real_normal(self, shape, std)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while training")

    monkeypatch.setattr(NoiseSource, "normal", normal)
    monkeypatch.setattr(dpmepf.Generator, "train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run.fit(private, None, _recipe(2.0), tmp_path / "r", ledger_dir=book_dir)
    book = ledgers.open_ledger(str(private), book_dir)
    (entry,) = book.read()["entries"]
    assert entry["status"] == "failed" and len(entry["charges"]) == 3
    assert seen_at_noise and all(len(h) == 3 for h in seen_at_noise)
    assert book.spent()[0] == pytest.approx(2.0, rel=2e-3)  # it counts in full
    assert not (tmp_path / "r").exists()


def test_budget_command_shows_and_limits(private, book_dir, tmp_path):
    env = {ledgers.ENV: str(book_dir)}
    empty = runner.invoke(app, ["budget", "--json"], env=env)
    assert empty.exit_code == 0 and json.loads(empty.stdout)["datasets"] == []
    set_ = runner.invoke(app, ["budget", str(private), "--limit", "0.5", "--delta", "1e-5"], env=env)
    assert set_.exit_code == 0, set_.output
    assert "no fits" not in set_.stdout and "of limit 0.5" in set_.stdout
    fit = runner.invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon", "1",
                              "--delta", "1e-5", "--out", str(tmp_path / "r"), "--set",
                              "dpmepf.steps=1", "--set", "data.resolution=16"], env=env)
    assert fit.exit_code == 4, fit.output  # over the limit: the documented budget exit code
    assert "limit" in fit.output and not (tmp_path / "r").exists()
    shown = runner.invoke(app, ["budget", str(private), "--json"], env=env)
    row = json.loads(shown.stdout)
    assert row["limit"] == {"epsilon": 0.5, "delta": 1e-5} and row["fits"] == []
    listing = runner.invoke(app, ["budget"], env=env)
    assert row["dataset"] in listing.stdout
    bad = runner.invoke(app, ["budget", "--limit", "3"], env=env)
    assert bad.exit_code == 2


def test_budget_refuses_an_unknown_name_and_creates_no_ledger(book_dir):
    env = {ledgers.ENV: str(book_dir)}
    ledgers.Ledger(book_dir, "xrays-2024").record([_one_shot("a", 2.0)], delta=1e-5, unit="image",
                                                  run="r", method="m")
    for args in (["xrays-2O24", "--limit", "8"], ["xrays-2O24"], ["xrays-2O24", "--remove-limit"]):
        typo = runner.invoke(app, ["budget", *args], env=env)
        assert typo.exit_code == 2, typo.output
        lines = typo.stderr.strip().splitlines()
        assert len(lines) == 1 and "no ledger for dataset 'xrays-2O24'" in lines[0]
        assert "did you mean 'xrays-2024'?" in lines[0] and "--create" in lines[0]
    other = runner.invoke(app, ["budget", "chest-ct", "--limit", "8"], env=env)
    assert other.exit_code == 2 and "known: xrays-2024" in other.stderr
    assert ledgers.datasets(book_dir) == ["xrays-2024"]  # no ledger for either misspelt name
    new = runner.invoke(app, ["budget", "chest-ct", "--create", "--limit", "8", "--delta", "1e-6",
                              "--json"], env=env)
    assert new.exit_code == 0, new.output
    assert json.loads(new.stdout)["limit"] == {"epsilon": 8.0, "delta": 1e-6}
    assert ledgers.datasets(book_dir) == ["chest-ct", "xrays-2024"]
    assert runner.invoke(app, ["budget", "chest-ct"], env=env).exit_code == 0
    alone = runner.invoke(app, ["budget", "lung", "--create"], env=env)
    assert alone.exit_code == 2 and "--limit" in alone.stderr


def test_a_limit_below_the_spend_is_refused(book_dir):
    book = ledgers.Ledger(book_dir, "spent")
    book.record([_one_shot("a", 1.0)], delta=1e-5, unit="image", run="r", method="m")
    spent = book.spent()[0]
    with pytest.raises(UsageError, match="already spent"):
        book.set_limit(spent / 2, 1e-5)
    assert book.read()["limit"] is None  # nothing written
    env = {ledgers.ENV: str(book_dir)}
    low = runner.invoke(app, ["budget", "spent", "--limit", "0.5"], env=env)
    assert low.exit_code == 2 and len(low.stderr.strip().splitlines()) == 1
    suggested = re.search(r"--limit (\S+) or more", low.stderr).group(1)
    assert float(suggested) >= spent and f"epsilon={spent:.4g}" in low.stderr
    assert book.read()["limit"] is None
    ok = runner.invoke(app, ["budget", "spent", "--limit", suggested], env=env)
    assert ok.exit_code == 0, ok.output
    book.set_limit(spent, 1e-5)  # exactly the spend: allowed, and it stops any further fit
    with pytest.raises(BudgetError):
        book.check((), delta=None, unit="image")


def test_a_fit_refused_for_its_epsilon_writes_no_ledger_id(private, book_dir, tmp_path):
    with pytest.raises(UsageError, match="privacy.epsilon must be set"):
        run.fit(private, None, resolve(TINY), tmp_path / "r", ledger_dir=book_dir)
    assert not (private / ledgers.ID_FILE).exists() and not book_dir.exists()
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a real SIGKILL of a separate process; in-process: a_fit_that_fails_after_charging
def test_kill_9_after_charging_leaves_the_spend_on_the_record(private, book_dir, tmp_path):
    """A real SIGKILL while the generator trains (after the release): the ledger still holds the
    fit's charges, counted once, and the run folder does not exist."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time, sys\n"
        "from privsynth import run\n"
        "from privsynth.generators import dpmepf\n"
        "from privsynth.recipe import resolve\n"
        "dpmepf.Generator.train = lambda *a, **k: time.sleep(600)\n"
        f"recipe = resolve({dict(TINY, privacy={'epsilon': 2.0})!r})\n"
        f"run.fit({str(private)!r}, None, recipe, {str(tmp_path / 'r')!r}, "
        f"ledger_dir={str(book_dir)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            key_file = private / ledgers.ID_FILE
            if key_file.exists() and ledgers.Ledger(book_dir, ledgers.dataset_key(private)).path.exists():
                break
            time.sleep(0.2)
        time.sleep(2)  # well into release / training
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    book = ledgers.open_ledger(str(private), book_dir)
    (entry,) = book.read()["entries"]
    assert entry["status"] == "charged" and len(entry["charges"]) == 3
    assert book.spent()[0] == pytest.approx(2.0, rel=2e-3)
    assert not (tmp_path / "r").exists()
