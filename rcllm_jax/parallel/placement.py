"""Which items-shard holds each item block.

`similarity` (the engine's default): blocks whose model embeddings are close share a shard, so a request whose
candidates come from one neighbourhood of the catalog (what a retrieval stage returns) finds most
of them on one device. Embedding = mean over the block's tokens of the final-layer residual stream
when the block is encoded for the cache (free: the same forward pass), L2-normalised (cosine).
Partition = capacity-constrained spherical k-means with one cluster per shard: each round assigns
blocks in order of regret (how much worse their second-best shard is) to the nearest centroid that
still has token capacity, then recomputes centroids. Capacity = ceil(1.05 x mean tokens per
shard), so the largest shard is within 5% (+ one block) of the mean.

`coaccess`: blocks of items that are requested together share a shard. The co-access log: the
candidate lists the retrieval stage returns for the training histories
(`retrieval.ItemKNN.coaccess_requests`). The graph: items are vertices weighted by their block's
tokens, an edge's weight the number of logged requests that hold both items (`coaccess_edges`).
Partition = METIS (`pymetis`) into N parts minimising the cut weight under a 3% load imbalance,
then a shard over the capacity below gives its least attached blocks to the least loaded shard
(the largest shard ends within the capacity + one block). Needs the log (`Engine(coaccess=...)`).
Measured on ML-100k (1682 items, the test users' retrieved top-20, 4 / 8 shards): local fraction
0.893 / 0.822, vs 0.854 / 0.774 with the retriever's item-item similarities as the edges.

`hash`: the baseline. A block's preferred shard is its content hash mod N; when that shard is at
capacity the block goes to the next one (consistent hashing with bounded loads), so loads stay
balanced under the same capacity.

**Hot-item replication** (`replicate` = r > 0, any placement; needs the co-access log): the items
the log would fetch remotely most often per token under the placement (affinity routing) are held
by every shard, up to r x the mean item tokens per shard in all (so no shard grows by more than
that); the other items are then placed again without them. A replicated block is local wherever a
request runs: it counts in no shard's bytes (the affinity rule, the scheduler, the reports).
Measured as above with r = 0.1: local fraction 0.928 / 0.867.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("similarity", "coaccess", "hash")
REPLICATED = -1  # the shard of a block held by every shard
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


def coaccess_placement(lengths, edges, num_shards: int, seed: int = 0) -> np.ndarray:
    """Shard of every block from a co-access graph: edges = (i [E], j [E], weight [E]) over block
    indices (either direction, duplicates keep the largest weight; weights > 0)."""
    import pymetis
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if num_shards == 1 or n == 0:
        return np.zeros(n, np.int32)
    i, j, w = (np.asarray(x) for x in edges)
    ok = (i != j) & (w > 0)
    a, b = np.minimum(i, j)[ok], np.maximum(i, j)[ok]
    wt = np.maximum(1, np.round(1000 * np.asarray(w, np.float64)[ok] / max(float(np.max(w[ok], initial=0)), 1e-12)))
    best: dict[tuple[int, int], int] = {}
    for x, y, v in zip(a.tolist(), b.tolist(), wt.astype(np.int64).tolist()):
        best[(x, y)] = max(best.get((x, y), 0), v)
    nbrs: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for (x, y), v in sorted(best.items()):
        nbrs[x].append((y, v))
        nbrs[y].append((x, v))
    xadj = np.cumsum([0] + [len(r) for r in nbrs]).astype(np.int64)
    adjncy = np.asarray([y for r in nbrs for y, _ in r], np.int64)
    eweights = np.asarray([v for r in nbrs for _, v in r], np.int64)
    if not len(adjncy):  # no edge at all: nothing to keep together
        return hash_placement([f"{k:016x}" for k in range(n)], lengths, num_shards)
    _, parts = pymetis.part_graph(num_shards, xadj=xadj, adjncy=adjncy, eweights=eweights,
                                  vweights=np.maximum(lengths, 1), options=pymetis.Options(ufactor=30, seed=seed))
    out = np.asarray(parts, np.int32)
    cap, load = _capacity(lengths, num_shards), np.bincount(out, weights=lengths, minlength=num_shards)
    for _ in range(n):  # repair: the fullest shard over capacity sheds its least attached block to the
        s, t = int(np.argmax(load)), int(np.argmin(load))  # emptiest while that lowers the larger of the two
        if load[s] <= cap:
            break
        members = [m for m in np.flatnonzero(out == s) if load[t] + lengths[m] < load[s]]
        if not members:
            break
        m = min(members, key=lambda m: (sum(v for y, v in nbrs[m] if out[y] == s), -lengths[m], m))
        out[m], load[s], load[t] = t, load[s] - lengths[m], load[t] + lengths[m]
    return out


def coaccess_edges(requests, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The co-access graph of a request log (lists of block indices < n): (i [E], j [E], count [E]),
    i < j, count = how many requests hold both."""
    codes = []
    for r in requests:
        r = np.unique(np.asarray(r, np.int64))
        a, b = np.triu_indices(len(r), 1)
        codes.append(r[a] * n + r[b])
    if not codes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    pair, count = np.unique(np.concatenate(codes), return_counts=True)
    return pair // n, pair % n, count.astype(np.float64)


def affinity(shards, lengths, num_shards: int) -> tuple[int, np.ndarray]:
    """(the shard a request runs on under the affinity rule, its tokens per shard [N]) for blocks
    at `shards` (REPLICATED: local everywhere, counted nowhere) with `lengths`: the shard holding
    most of them (lowest on ties)."""
    shards, lengths = np.asarray(shards, np.int64), np.asarray(lengths, np.int64)
    held = shards != REPLICATED
    load = shard_tokens(shards[held], lengths[held], num_shards)
    return int(np.argmax(load)), load


def remote_accesses(shards, lengths, requests, num_shards: int) -> np.ndarray:
    """[n] how often each block is read from another shard when the request log runs under the
    affinity rule (REPLICATED is local)."""
    shards, lengths = np.asarray(shards), np.asarray(lengths, np.int64)
    out = np.zeros(len(shards), np.int64)
    for r in requests:
        r = np.asarray(r, np.int64)
        dest, _ = affinity(shards[r], lengths[r], num_shards)
        np.add.at(out, r[(shards[r] != REPLICATED) & (shards[r] != dest)], 1)
    return out


def replicas(shards, lengths, requests, num_shards: int, budget_tokens: int) -> np.ndarray:
    """[n] bool: the blocks to hold on every shard, at most `budget_tokens` in all, chosen greedily
    by remote reads per token under `shards` (ties: the lower index)."""
    lengths = np.asarray(lengths, np.int64)
    value = remote_accesses(shards, lengths, requests, num_shards) / np.maximum(lengths, 1)
    out = np.zeros(len(lengths), bool)
    used = 0
    for m in np.lexsort((np.arange(len(lengths)), -value)):
        if value[m] <= 0:
            break
        if used + lengths[m] <= budget_tokens:
            out[m], used = True, used + lengths[m]
    return out


def _place_all(name: str, keys, lengths, embeddings, num_shards: int, requests) -> np.ndarray:
    if name == "similarity":
        return similarity_placement(embeddings, lengths, num_shards)
    if name == "coaccess":
        if requests is None:
            raise ValueError("coaccess placement needs the co-access log: Engine(coaccess=...) (the retriever's "
                             "candidate lists for the training histories, ItemKNN.coaccess_requests)")
        return coaccess_placement(lengths, coaccess_edges(requests, len(lengths)), num_shards)
    if name == "hash":
        return hash_placement(keys, lengths, num_shards)
    raise ValueError(f"unknown placement {name!r}: {' | '.join(PLACEMENTS)}")


def check_replicate(replicate: float) -> float:
    """A replication budget as a float, refused outside [0, 1]."""
    if not 0.0 <= float(replicate) <= 1.0:
        raise ValueError(f"replicate must be a fraction of a shard's tokens in [0, 1], got {replicate}")
    return float(replicate)


def replication_budget(lengths, num_shards: int, replicate: float) -> int:
    """Tokens that may be held on every shard: `replicate` x the mean tokens per shard."""
    return int(np.floor(replicate * float(np.sum(lengths)) / num_shards))


def place(name: str, *, keys, lengths, embeddings, num_shards: int, requests=None,
          replicate: float = 0.0) -> np.ndarray:
    """Shard index (or REPLICATED) of every block: arrays in the order of keys; requests: the
    co-access log as lists of those indices (`coaccess`, and any placement with replicate > 0)."""
    replicate = check_replicate(replicate)
    shards = _place_all(name, keys, lengths, embeddings, num_shards, requests)
    if replicate == 0 or num_shards == 1 or not len(shards):
        return shards
    if requests is None:
        raise ValueError("hot-item replication needs the co-access log: Engine(coaccess=...) (which items "
                         "requests fetch remotely)")
    lengths = np.asarray(lengths, np.int64)
    hot = replicas(shards, lengths, requests, num_shards, replication_budget(lengths, num_shards, replicate))
    rest = np.flatnonzero(~hot)
    at = np.full(len(lengths), -1, np.int64)
    at[rest] = np.arange(len(rest))
    sub = [at[np.asarray(r, np.int64)] for r in requests]
    out = np.full(len(lengths), REPLICATED, np.int32)
    out[rest] = _place_all(name, [keys[m] for m in rest], lengths[rest], np.asarray(embeddings)[rest], num_shards,
                           [r[r >= 0] for r in sub])
    return out


def extend(name: str, *, keys, lengths, embeddings, placed_shards, placed_lengths, placed_embeddings,
           num_shards: int) -> np.ndarray:
    """Shards of blocks added to a placed store whose blocks stay where they are (an incremental
    catalog update: nothing placed moves). Each new block, largest first, goes to its preferred
    shard with room under the capacity of the grown store: `hash` its content hash's (then the
    next), any other placement the shard whose placed blocks' mean embedding is nearest (cosine;
    a co-access placement has no log for new items). Replicated blocks stay replicated; new ones
    are not (a full build places and replicates everything again)."""
    placed_shards = np.asarray(placed_shards, np.int64)
    lengths, held = np.asarray(lengths, np.int64), placed_shards != REPLICATED
    load = shard_tokens(placed_shards[held], np.asarray(placed_lengths, np.int64)[held], num_shards)
    cap = _capacity(np.concatenate([np.asarray(placed_lengths, np.int64)[held], lengths]), num_shards)
    out = np.zeros(len(keys), np.int32)
    if name == "hash":
        prefs = [[(int(k[:12], 16) + j) % num_shards for j in range(num_shards)] for k in keys]
    else:
        x = np.asarray(embeddings, np.float64).reshape(len(keys), -1)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        pe = np.asarray(placed_embeddings, np.float64).reshape(len(placed_shards), -1)
        pe = pe / np.maximum(np.linalg.norm(pe, axis=1, keepdims=True), 1e-12)
        cent = np.zeros((num_shards, x.shape[1]))
        for s in range(num_shards):
            if np.any(held & (placed_shards == s)):
                cent[s] = pe[held & (placed_shards == s)].mean(0)
        prefs = [list(np.argsort(-(cent @ row), kind="stable")) for row in x]
    for i in np.argsort(-lengths, kind="stable"):
        s = next((t for t in prefs[i] if load[t] + lengths[i] <= cap), int(np.argmin(load)))
        out[i], load[s] = s, load[s] + lengths[i]
    return out


def shard_tokens(shards, lengths, num_shards: int) -> np.ndarray:
    """[N] tokens per shard of blocks at `shards` with `lengths` (a request's need per shard)."""
    return np.bincount(np.asarray(shards, np.int64), weights=np.asarray(lengths, np.int64),
                       minlength=num_shards).astype(np.int64)


def locality(shard_of: dict, lengths: dict, requests, num_shards: int) -> dict:
    """How local a request stream is under a placement when each request runs on the shard holding
    most of its candidates' tokens (the engine's affinity rule). shard_of / lengths: item id ->
    shard (or REPLICATED: local everywhere) / block tokens; requests: candidate id lists. Returns
    means per request."""
    frac, remote_blocks, remote_tokens = [], [], []
    for cands in requests:
        dest, load = affinity([shard_of[c] for c in cands], [lengths[c] for c in cands], num_shards)
        remote = int(load.sum() - load[dest])
        frac.append(1.0 - remote / max(sum(lengths[c] for c in cands), 1))
        remote_blocks.append(sum(shard_of[c] not in (dest, REPLICATED) for c in cands))
        remote_tokens.append(remote)
    return {"local_fraction": float(np.mean(frac)), "remote_blocks_per_request": float(np.mean(remote_blocks)),
            "remote_tokens_per_request": float(np.mean(remote_tokens))}
