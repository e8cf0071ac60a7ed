"""TOML presets under configs/: flat `section.key` values that absl flags may override."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from absl import flags


def apply_toml(path: str | Path, allowed: dict[str, str]) -> dict[str, Any]:
    """Set absl flags from a TOML preset unless given on the command line.

    `allowed` maps `section.key` -> flag name; unknown keys are errors (a typo must not pass).
    Returns the values applied.
    """
    data = tomllib.loads(Path(path).read_text())
    applied = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            name = allowed.get(f"{section}.{key}")
            if name is None:
                raise ValueError(f"{path}: unknown key {section}.{key}; known: {', '.join(sorted(allowed))}")
            fl = flags.FLAGS[name]
            if not fl.present:  # the command line wins
                fl.value = value
                applied[name] = value
    return applied
