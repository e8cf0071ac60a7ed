"""Prefill modes and candidate ranking."""
