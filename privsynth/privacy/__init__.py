"""The only package that adds noise or counts epsilon.

- `accounting`: epsilon of a history of Gaussian mechanisms (PRV by default, RDP selectable).
- `budget`: `Charge` (one mechanism as plain data) and `Budget` (target, calibration, spending).
- `mechanisms`: clipping + Gaussian noise, with noise drawn from OS entropy.
- `ledger`: the persistent per-dataset record of every fit's charges, and the owner's limit.
- `units`: the privacy unit (one image, or all images of a person named by a column or folder).
"""
from privsynth.privacy.accounting import ACCOUNTANTS, epsilon
from privsynth.privacy.budget import Budget, Charge
from privsynth.privacy.mechanisms import GaussianSum, NoiseSource

__all__ = ["ACCOUNTANTS", "Budget", "Charge", "GaussianSum", "NoiseSource", "epsilon"]
