"""Benchmarks: `python -m bench run mnist --method dp-mepf --epsilon 10` (see benchmarks/README.md)."""
