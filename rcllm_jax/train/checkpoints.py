"""The training runs' checkpoint directory: an Orbax CheckpointManager under <dir>/ckpt, bound to
the run that wrote it by <dir>/run.json (base model, settings, data): a run with another identity
is refused instead of resuming from someone else's weights."""

from __future__ import annotations

import json
from pathlib import Path


class CheckpointMismatchError(ValueError):
    """A checkpoint directory written by a different run (model, data or trained parameters)."""


def open_manager(path, identity: dict, keep: int, describe=None):
    """The manager of `path` for a run of `identity` (JSON-able; compared as run.json reads back).
    describe(old identity) -> what differs, for the refusal (default: the differing keys)."""
    import orbax.checkpoint as ocp
    path = Path(path).resolve()
    ident = path / "run.json"
    identity = json.loads(json.dumps(identity))
    if ident.exists():
        old = json.loads(ident.read_text())
        if old != identity:
            what = describe(old) if describe else ", ".join(k for k in identity if old.get(k) != identity[k])
            raise CheckpointMismatchError(f"{path} holds checkpoints of another run (different {what}); use a new "
                                          "checkpoint / output directory or the original settings")
    else:
        path.mkdir(parents=True, exist_ok=True)
        tmp = ident.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=1))
        tmp.rename(ident)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path / "ckpt", options=opts)
