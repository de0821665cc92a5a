"""The only package that adds noise or counts epsilon.

- `accounting`: epsilon of a history of Gaussian mechanisms (PRV by default, RDP selectable).
- `budget`: `Charge` (one mechanism as plain data) and `Budget` (target, calibration, spending).
- `mechanisms`: clipping + Gaussian noise, with noise drawn from OS entropy.
"""
from privsynth.privacy.accounting import ACCOUNTANTS, epsilon
from privsynth.privacy.budget import Budget, Charge
from privsynth.privacy.mechanisms import GaussianSum, NoiseSource

__all__ = ["ACCOUNTANTS", "Budget", "Charge", "GaussianSum", "NoiseSource", "epsilon"]
