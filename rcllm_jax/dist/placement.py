"""Which items-shard holds each item block.

`similarity` (default): blocks whose model embeddings are close share a shard, so a request whose
candidates come from one neighbourhood of the catalog (what a retrieval stage returns) finds most
of them on one device. Embedding = mean over the block's tokens of the final-layer residual stream
when the block is encoded for the cache (free: the same forward pass), L2-normalised (cosine).
Partition = capacity-constrained spherical k-means with one cluster per shard: each round assigns
blocks in order of regret (how much worse their second-best shard is) to the nearest centroid that
still has token capacity, then recomputes centroids. Capacity = ceil(1.05 x mean tokens per
shard), so the largest shard is within 5% (+ one block) of the mean.

`hash`: the baseline. A block's preferred shard is its content hash mod N; when that shard is at
capacity the block goes to the next one (consistent hashing with bounded loads), so loads stay
balanced under the same capacity.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("similarity", "hash")
CAPACITY_FACTOR = 1.05


def _capacity(lengths, n: int) -> int:
    return int(np.ceil(CAPACITY_FACTOR * np.sum(lengths) / n))


def hash_placement(keys, lengths, num_shards: int) -> np.ndarray:
    lengths = np.asarray(lengths, np.int64)
    cap, load = _capacity(lengths, num_shards), np.zeros(num_shards, np.int64)
    out = np.empty(len(keys), np.int32)
    for i, key in enumerate(keys):
        s = int(key[:12], 16) % num_shards
        for step in range(num_shards):
            t = (s + step) % num_shards
            if load[t] + lengths[i] <= cap or step == num_shards - 1:
                break
        if load[t] + lengths[i] > cap:  # every shard full (only with blocks larger than the slack)
            t = int(np.argmin(load))
        out[i], load[t] = t, load[t] + lengths[i]
    return out


def similarity_placement(embeddings, lengths, num_shards: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    lengths = np.asarray(lengths, np.int64)
    n = len(x)
    if num_shards == 1 or n == 0:
        return np.zeros(n, np.int32)
    cap = _capacity(lengths, num_shards)
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance
    cent = [x[rng.integers(n)]]
    for _ in range(1, num_shards):
        d = np.maximum(1.0 - np.max(x @ np.stack(cent).T, axis=1), 0.0)
        cent.append(x[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else x[rng.integers(n)])
    cent = np.stack(cent)
    assign = np.zeros(n, np.int32)
    for _ in range(iters):
        sim = x @ cent.T  # [n, N]
        ranked = np.argsort(-sim, axis=1)
        top2 = np.take_along_axis(sim, ranked[:, :2], axis=1)
        order = np.argsort(-(top2[:, 0] - top2[:, 1]), kind="stable")
        load = np.zeros(num_shards, np.int64)
        new = np.empty(n, np.int32)
        for i in order:
            for s in ranked[i]:
                if load[s] + lengths[i] <= cap:
                    break
            else:
                s = int(np.argmin(load))
            new[i], load[s] = s, load[s] + lengths[i]
        converged = np.array_equal(new, assign)
        assign = new
        for s in range(num_shards):
            members = x[assign == s]
            if len(members):
                c = members.mean(0)
                cent[s] = c / max(np.linalg.norm(c), 1e-12)
        if converged:
            break
    return assign


def place(name: str, *, keys, lengths, embeddings, num_shards: int) -> np.ndarray:
    """Shard index of every block (arrays in the same order as keys)."""
    if name == "similarity":
        return similarity_placement(embeddings, lengths, num_shards)
    if name == "hash":
        return hash_placement(keys, lengths, num_shards)
    raise ValueError(f"unknown placement {name!r}: {' | '.join(PLACEMENTS)}")


def shard_tokens(shards, lengths, num_shards: int) -> np.ndarray:
    """[N] tokens per shard of blocks at `shards` with `lengths` (a request's need per shard)."""
    return np.bincount(np.asarray(shards, np.int64), weights=np.asarray(lengths, np.int64),
                       minlength=num_shards).astype(np.int64)


def locality(shard_of: dict, lengths: dict, requests, num_shards: int) -> dict:
    """How local a request stream is under a placement when each request runs on the shard holding
    most of its candidates' tokens (the engine's affinity rule). shard_of / lengths: item id ->
    shard / block tokens; requests: candidate id lists. Returns means per request."""
    frac, remote_blocks, remote_tokens = [], [], []
    for cands in requests:
        load = shard_tokens([shard_of[c] for c in cands], [lengths[c] for c in cands], num_shards)
        dest = int(np.argmax(load))
        frac.append(load[dest] / max(load.sum(), 1))
        remote_blocks.append(sum(shard_of[c] != dest for c in cands))
        remote_tokens.append(int(load.sum() - load[dest]))
    return {"local_fraction": float(np.mean(frac)), "remote_blocks_per_request": float(np.mean(remote_blocks)),
            "remote_tokens_per_request": float(np.mean(remote_tokens))}
