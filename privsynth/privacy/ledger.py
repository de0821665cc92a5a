"""A persistent budget ledger per private dataset: every fit's charges, composed across fits.

Identity. A dataset is named by a key that says nothing about its content: either a name the owner
chooses (`--dataset NAME`), or a random id kept in a small file `PRIVATE/.privsynth-dataset` that
the first fit writes (hidden files are never read as images). A per-file hash would let anyone who
holds the ledger test whether a given image is in the dataset; a random id does not. The id file
travels with the folder, so a moved or copied folder keeps its history; a path would not.

Location. `--ledger DIR`, else the `PRIVSYNTH_LEDGER` environment variable, else
`$XDG_DATA_HOME/privsynth/ledger` (`~/.local/share/privsynth/ledger`). One JSON file per dataset,
rewritten atomically (temp file + rename) under an exclusive lock, so two fits cannot both spend
the last of a limit.

Composition. The ledger composes the charges of every fit in the same accountant as a certificate
(`privacy.accounting.epsilon`, PRV) at the ledger's delta: the owner's limit delta, or without a
limit the smallest delta of any recorded fit. That is a valid (epsilon, delta) bound for all the
fits' outputs together, tighter than adding the fits' epsilons.

Write-ahead. A fit's charges are recorded (status "charged") before any noise is drawn and before
any private pixel is read; a fit that fails or is killed afterwards keeps its charges on the record.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Iterator, Sequence

from privsynth.errors import BudgetError, UsageError
from privsynth.privacy.accounting import epsilon
from privsynth.privacy.budget import Charge

ENV = "PRIVSYNTH_LEDGER"
ID_FILE = ".privsynth-dataset"
SCHEMA = "privsynth.ledger/1"
ACCOUNTANT = "prv"  # the certificate's default; it falls back to RDP only where PRV cannot run
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def location(explicit: Path | None = None) -> Path:
    """The ledger folder: `explicit`, else $PRIVSYNTH_LEDGER, else the user's data folder."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "privsynth" / "ledger"


def dataset_key(private_dir: Path | None, name: str | None = None, *, create: bool = True) -> str:
    """The ledger key of a dataset: `name` if given, else the random id in PRIVATE/.privsynth-dataset.

    With `create`, a folder without an id file gets one (a fresh random id). Reads no image.
    """
    if name is not None:
        if not _NAME.fullmatch(name):
            raise UsageError(f"dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return name
    if private_dir is None or not Path(private_dir).is_dir():
        raise UsageError(f"{private_dir} is not a folder; pass a private folder or --dataset NAME")
    path = Path(private_dir) / ID_FILE
    if not path.exists() and create:
        _create_id(path)
    try:
        key = json.loads(path.read_text(encoding="utf-8"))["id"]
    except FileNotFoundError:
        raise UsageError(f"{private_dir} has no ledger id yet ({ID_FILE}); no fit has used it") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{path} is damaged; restore it or pass --dataset NAME") from None
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise UsageError(f"{path} holds an invalid id; restore it or pass --dataset NAME")
    return key


def _create_id(path: Path) -> None:
    record = {"id": "ds-" + secrets.token_hex(16), "created": _now(),
              "about": "privsynth budget ledger id of this folder (random; says nothing about "
                       "the images). Keep it with the folder: deleting it starts a new ledger."}
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": never replace another fit's id
            f.write(json.dumps(record, indent=2) + "\n")
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot write the ledger id file {path} ({exc.strerror}); pass "
                         "--dataset NAME to name this dataset in the ledger instead") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Ledger:
    """The spending record of one dataset, in `folder/<key>.json`."""

    def __init__(self, folder: Path, key: str) -> None:
        if not _NAME.fullmatch(key):
            raise UsageError(f"invalid ledger key {key!r}")
        self.folder, self.key = Path(folder), key
        self.path = self.folder / f"{key}.json"

    def read(self) -> dict:
        """The ledger's state (an empty one if nothing was recorded yet)."""
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"schema": SCHEMA, "dataset": self.key, "unit": None, "limit": None,
                    "accountant": ACCOUNTANT, "entries": []}
        except json.JSONDecodeError as exc:
            raise BudgetError(f"ledger {self.path} is damaged ({exc.msg}); refusing to spend "
                              "until it is restored") from None
        if state.get("schema") != SCHEMA:
            raise BudgetError(f"ledger {self.path} has unknown schema {state.get('schema')!r}")
        return state

    def spent(self, state: dict | None = None, extra: Sequence[Charge] = (),
              extra_delta: float | None = None) -> tuple[float, float | None]:
        """(epsilon, delta) of every recorded charge plus `extra`, composed at the ledger's delta."""
        state = self.read() if state is None else state
        delta = _ledger_delta(state, extra_delta)
        if delta is None:
            return 0.0, None
        history = [(c["noise_multiplier"], c["sample_rate"], c["steps"])
                   for e in state["entries"] for c in e["charges"]]
        history += [c.history() for c in extra]
        return epsilon(history, delta, state.get("accountant", ACCOUNTANT)), delta

    def set_limit(self, eps: float | None, delta: float | None) -> dict:
        """Set (or with eps=None remove) the owner's total limit; returns the new state.

        A limit below what the recorded fits have already spent (at the limit's delta) is
        refused: it could never hold. A limit equal to the spend stops any further fit."""
        if eps is not None and not (0 < eps < float("inf")):
            raise UsageError(f"the limit epsilon must be a positive number, got {eps}")
        if delta is not None and not 0 < delta < 1:
            raise UsageError(f"the limit delta must be in (0, 1), got {delta}")
        with self._locked() as state:
            state["limit"] = None if eps is None else {"epsilon": eps, "delta": delta}
            if eps is not None and delta is None:
                state["limit"]["delta"] = _ledger_delta(state, None)
            if eps is not None and state["limit"]["delta"] is None:
                raise UsageError("pass --delta with --limit: no fit has recorded a delta yet")
            if eps is not None and state["entries"]:
                spent, at = self.spent(state)
                if eps < spent:
                    raise UsageError(
                        f"dataset {self.key} has already spent epsilon={spent:.4g} (delta "
                        f"{at:.3g}) in {len(state['entries'])} fit(s): a limit of {eps:g} could "
                        f"never hold; pass --limit {_round_up(spent)} or more (that much stops "
                        "further fits)")
            return state

    def check(self, charges: Sequence[Charge], *, delta: float | None, unit: str) -> None:
        """Refuse (BudgetError) if `charges` would take the dataset past its limit.

        With no charges: refuse if nothing is left (or the unit differs), before planning a fit.
        """
        self._refusal(self.read(), charges, delta, unit)

    def record(self, charges: Sequence[Charge], *, delta: float, unit: str, run: str,
               method: str) -> str:
        """Check, then append `charges` as a new entry (status "charged"); return its id."""
        with self._locked() as state:
            self._refusal(state, charges, delta, unit)
            entry_id = secrets.token_hex(8)
            state["unit"] = unit
            state["entries"].append({
                "id": entry_id, "created": _now(), "status": "charged", "run": run,
                "method": method, "delta": delta, "charges": [c.to_dict() for c in charges]})
            return entry_id

    def finish(self, entry_id: str, status: str) -> None:
        """Mark an entry "completed" or "failed" (its charges count either way)."""
        with self._locked() as state:
            for entry in state["entries"]:
                if entry["id"] == entry_id:
                    entry["status"] = status

    def _refusal(self, state: dict, charges: Sequence[Charge], delta: float | None,
                 unit: str) -> None:
        if state["unit"] not in (None, unit):
            raise BudgetError(
                f"dataset {self.key} is accounted per privacy unit {state['unit']!r}, this fit "
                f"uses {unit!r}: the two guarantees do not compose; keep the unit or pass "
                "--dataset NAME for a separate ledger")
        if state["limit"] is None:
            return
        total, at = self.spent(state, charges, delta)
        limit = state["limit"]
        if total > limit["epsilon"] or (not charges and total >= limit["epsilon"]):
            before, _ = self.spent(state, (), delta)
            raise BudgetError(
                f"dataset {self.key}: this fit would bring its total to epsilon={total:.4g} "
                f"(delta={at or limit['delta']:.3g}), over the owner's limit {limit['epsilon']:g}; already spent "
                f"{before:.4g} in {len(state['entries'])} fit(s). Nothing was read. See "
                f"`privsynth budget`")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The state under an exclusive lock; written back atomically if the block succeeds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f".{self.key}.lock", "a") as lock:
            _lock(lock)
            state = self.read()
            yield state
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


def _lock(file) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock (documented)
        return
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)


def _ledger_delta(state: dict, extra: float | None) -> float | None:
    """The owner's limit delta, else the smallest delta of any fit (recorded or `extra`)."""
    if state.get("limit") and state["limit"].get("delta"):
        return float(state["limit"]["delta"])
    deltas = [e["delta"] for e in state["entries"]] + ([extra] if extra is not None else [])
    return min(deltas) if deltas else None


def _round_up(eps: float) -> str:
    """`eps` written with 4 significant digits, rounded up (so it is not below `eps`)."""
    text = f"{eps:.4g}"
    step = 10 ** (math.floor(math.log10(eps)) - 3) if eps > 0 else 0
    return text if float(text) >= eps else f"{float(text) + step:.4g}"


def datasets(folder: Path) -> list[str]:
    """Keys of every dataset with a ledger in `folder`."""
    return sorted(p.stem for p in Path(folder).glob("*.json") if not p.name.startswith("."))


def open_ledger(dataset: str, folder: Path | None = None, *, create: bool = False,
                new_name: bool = False) -> Ledger:
    """The ledger of `dataset`: a private folder (its id file) or a dataset name.

    A folder without an id file gets one only with `create`. A name must already have a ledger
    in the folder (a fit with `--dataset NAME` starts it), unless `new_name`: a misspelt name
    must not silently start an empty ledger (and a limit that guards nothing)."""
    path = Path(dataset)
    if path.is_dir():
        return Ledger(location(folder), dataset_key(path, create=create))
    if not _NAME.fullmatch(dataset):
        raise UsageError(f"{dataset!r} is neither a folder nor a dataset name (1-64 letters, "
                         "digits, '.', '_' or '-')")
    book = Ledger(location(folder), dataset_key(None, dataset))
    if not new_name and not book.path.exists():
        raise UsageError(_unknown(dataset, book.folder))
    return book


def _unknown(name: str, folder: Path) -> str:
    """Why `name` has no ledger in `folder`: the close or known names, and how to start one."""
    known = datasets(folder)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        others = f"did you mean {close[0]!r}?"
    elif known:
        shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        others = f"known: {shown}"
    else:
        others = "it holds no dataset yet"
    return (f"no ledger for dataset {name!r} in {folder} ({others}); a name's ledger starts with "
            f"its first `privsynth fit ... --dataset {name}`, or pass --create to set its limit "
            "before that")


def summary(ledger: Ledger) -> dict:
    """What `privsynth budget` shows: the limit, the composed spend and every fit, as data."""
    state = ledger.read()
    eps, delta = ledger.spent(state)
    fits = []
    for e in state["entries"]:
        own = epsilon([(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in e["charges"]],
                      e["delta"], state.get("accountant", ACCOUNTANT))
        fits.append({"created": e["created"], "status": e["status"], "method": e["method"],
                     "run": e["run"], "epsilon": own, "delta": e["delta"],
                     "mechanisms": len(e["charges"])})
    return {"dataset": ledger.key, "ledger": str(ledger.path), "unit": state["unit"],
            "limit": state["limit"], "spent": {"epsilon": eps, "delta": delta},
            "composition": f"all fits' mechanisms composed by the {ACCOUNTANT.upper()} accountant",
            "fits": fits}
