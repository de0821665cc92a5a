"""The privacy certificate: issue it from a spent `Budget`, render it in words, verify it.

Fields are modelled on the OpenDP / NIST differential-privacy deployments registry: privacy
unit, neighbouring relation, (epsilon, delta), every mechanism with its noise, composition,
what is *not* protected, implementation and library versions. It holds no noise seed and no
per-file hash of any private image (either would help an attacker).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from importlib import metadata
from pathlib import Path

from privsynth.errors import UsageError, VerificationError
from privsynth.privacy import Budget, Charge, epsilon

SCHEMA = "privsynth.certificate/1"
# `verify` accepts a recomputed epsilon this close to the recorded one (PRV numerics may move in
# the last digits across library builds); anything above the target is always a failure.
VERIFY_RTOL = 1e-3
_LIBRARIES = ("privsynth", "torch", "opacus", "numpy", "scipy", "diffusers", "open_clip_torch",
              "efficientnet-lite-pytorch", "clean-fid")
NEIGHBOURING = ("add/remove one privacy unit (unbounded DP): two datasets are neighbours if one "
                "is the other with all images of one unit added or removed")


def versions() -> dict[str, str]:
    """Installed versions of the libraries the guarantee rests on."""
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def replace_one(eps: float, delta: float) -> tuple[float, float]:
    """The guarantee for replace-one neighbours implied by add/remove (eps, delta)-DP: replacing
    a unit is one removal then one addition, and group privacy over those two steps gives
    (2 eps, (1 + e^eps) delta), delta capped at 1."""
    return 2 * eps, min(1.0, delta + math.exp(min(eps + math.log(delta), 0.0)))


def issue(budget: Budget, *, method: str, privacy_unit: str, delta_rule: str,
          unprotected: list[str], post_processing: str, noise_rng: dict,
          notes: list[str] = (), unit: dict | None = None, n_public: bool = False) -> dict:
    """The certificate of everything `budget` was charged for (fields: certificate_schema.json).
    `n_public`: `unprotected` names N, so the notes say what replace-one neighbours get."""
    cert = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "guarantee": "(epsilon, delta)-differential privacy of the whole run's output "
                     "(model and every dataset sampled from it) with respect to the private folder",
        "privacy_unit": privacy_unit,
        "neighbouring_relation": NEIGHBOURING,
        "epsilon": {"target": budget.epsilon_target, "spent": budget.spent()},
        "delta": budget.delta,
        "delta_rule": delta_rule,
        "accountant": budget.accountant,
        "composition": "all mechanisms below composed in one accountant (adaptive sequential "
                       "composition); nothing else read private data",
        "mechanisms": [dict(c.to_dict(), noise_std=c.noise_multiplier * c.sensitivity)
                       for c in budget.charges],
        "post_processing": post_processing,
        "unprotected": list(unprotected),
        "notes": list(notes),
        "implementation": {"method": method, "noise_rng": noise_rng, "versions": versions()},
    }
    if unit is not None:  # the unit as data, and how its contribution is bounded
        cert["unit"] = dict(unit)
    if n_public:
        eps2, delta2 = replace_one(cert["epsilon"]["spent"], budget.delta)
        cert["notes"].append(
            "N is not protected (above), so the neighbouring relation that matters is replace-one: "
            "two datasets with the same N that differ in one unit. Replacing a unit is one removal "
            "and one addition, so by group privacy this run is (2 epsilon, (1 + e^epsilon) delta) "
            f"= ({eps2:.4g}, {delta2:.3g})-differentially private for replace-one neighbours.")
    return cert


def recompute(cert: dict) -> float:
    """Epsilon of the certificate's own mechanisms, composed by its own accountant."""
    try:
        charges = [Charge(**{k: m[k] for k in ("name", "noise_multiplier", "sample_rate", "steps",
                                              "sensitivity", "releases")})
                   for m in cert["mechanisms"]]
        return epsilon([c.history() for c in charges], cert["delta"], cert["accountant"])
    except (KeyError, TypeError) as exc:
        raise VerificationError(f"certificate is malformed: missing or bad field {exc}") from None


def check(cert: dict) -> list[str]:
    """Problems with a certificate (empty when its epsilon recomputes and fits its target)."""
    if cert.get("schema") != SCHEMA:
        return [f"unknown schema {cert.get('schema')!r} (expected {SCHEMA})"]
    problems = []
    eps = recompute(cert)
    recorded, target = cert["epsilon"]["spent"], cert["epsilon"]["target"]
    if not math.isclose(eps, recorded, rel_tol=VERIFY_RTOL, abs_tol=1e-9):
        problems.append(f"recorded epsilon {recorded:.6g} but the mechanisms give {eps:.6g}")
    if eps > target * (1 + 1e-9):
        problems.append(f"epsilon {eps:.6g} exceeds the target {target:.6g}")
    for m in cert["mechanisms"]:
        if not math.isclose(m.get("noise_std", -1), m["noise_multiplier"] * m["sensitivity"],
                            rel_tol=1e-9):
            problems.append(f"mechanism {m['name']}: noise_std is not sigma x sensitivity")
    return problems


def load(path: Path) -> dict:
    """Read a certificate.json (or the one inside a run or dataset folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "certificate.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no certificate at {path}") from None
    except json.JSONDecodeError as exc:
        raise VerificationError(f"{path} is not JSON: {exc}") from None


def render(cert: dict) -> str:
    """CERTIFICATE.md: the certificate in plain language."""
    eps, lines = cert["epsilon"], []
    lines += [f"# Privacy certificate ({cert['implementation']['method']})", "",
              f"This run satisfies **({eps['spent']:.4g}, {cert['delta']:.3g})-differential privacy** "
              f"(target epsilon {eps['target']:.4g}), accounted with the "
              f"{cert['accountant'].upper()} accountant.", "",
              f"- **Privacy unit:** {cert['privacy_unit']}",
              *([f"- **Per-unit bound:** {cert['unit']['bound']}"] if cert.get("unit") else []),
              f"- **Neighbouring datasets:** {cert['neighbouring_relation']}",
              f"- **Delta:** {cert['delta_rule']}",
              f"- **What it covers:** {cert['guarantee']}.",
              f"- **After the noise:** {cert['post_processing']}", "",
              "## Mechanisms (every read of private data)", "",
              "| name | releases | sigma | L2 sensitivity | noise std | sample rate | steps |",
              "|---|---|---|---|---|---|---|"]
    for m in cert["mechanisms"]:
        lines.append(f"| {m['name']} | {m['releases']} | {m['noise_multiplier']:.5g} | "
                     f"{m['sensitivity']:.4g} | {m['noise_std']:.5g} | {m['sample_rate']:.4g} | "
                     f"{m['steps']} |")
    lines += ["", f"Composition: {cert['composition']}.", "", "## Not protected", ""]
    lines += [f"- {item}" for item in cert["unprotected"]]
    if cert.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in cert["notes"]]
    impl = cert["implementation"]
    rng = impl["noise_rng"]
    rng = ", ".join(f"{k}: {v}" for k, v in rng.items()) if isinstance(rng, dict) else rng
    lines += ["", "## Implementation", "", f"- Noise: {rng}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in impl["versions"].items()), "",
              "Re-check with `privsynth verify <this folder>`: it recomputes epsilon from the "
              "mechanisms above.", ""]
    return "\n".join(lines)
