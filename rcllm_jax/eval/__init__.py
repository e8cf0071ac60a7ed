"""Ranking metrics and baselines."""
