"""Block identity: content hash of the tokens, bound to the model and the canonical context."""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def model_fingerprint(params, cfg) -> str:
    """Digest of the configuration and every parameter byte: caches of other weights never match."""
    h = hashlib.blake2b(cfg.identity_text().encode(), digest_size=16)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda t: str(t[0])):
        h.update(str(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def block_key(fingerprint: str, context: tuple[int, ...], tokens: tuple[int, ...]) -> str:
    """Key of a block's KV: the model, the canonical context it was encoded after, its tokens."""
    h = hashlib.blake2b(fingerprint.encode(), digest_size=16)
    h.update(np.asarray(context, np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.hexdigest()


def chain_hash(parent: str, tokens: tuple[int, ...]) -> str:
    """vLLM-style prefix-cache page hash: the parent page's hash and this page's tokens."""
    h = hashlib.blake2b(parent.encode(), digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.hexdigest()
