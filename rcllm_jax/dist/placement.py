"""Which items-shard holds each item block.

`similarity` (default): blocks whose model embeddings are close share a shard, so a request whose
candidates come from one neighbourhood of the catalog (what a retrieval stage returns) finds most
of them on one device. Embedding = mean over the block's tokens of the final-layer residual stream
when the block is encoded for the cache (free: the same forward pass), L2-normalised (cosine).
Partition = capacity-constrained spherical k-means with one cluster per shard: each round assigns
blocks in order of regret (how much worse their second-best shard is) to the nearest centroid that
still has token capacity, then recomputes centroids. Capacity = ceil(1.05 x mean tokens per
shard), so the largest shard is within 5% (+ one block) of the mean.

`coaccess`: blocks of items that are requested together share a shard. The graph: items are
vertices weighted by their block's tokens, edges the retriever's item-to-item similarities
(`retrieval.ItemKNN`: co-occurrence in training sequences, what decides which items one
request's candidates are); partition = METIS (`pymetis`) into N parts minimising the cut weight
under a 3% load imbalance, then a shard over the capacity below gives its least attached blocks
to the least loaded shard (the largest shard ends within the capacity + one block). Needs the graph (`Engine(coaccess=retriever)`).

`hash`: the baseline. A block's preferred shard is its content hash mod N; when that shard is at
capacity the block goes to the next one (consistent hashing with bounded loads), so loads stay
balanced under the same capacity.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("similarity", "coaccess", "hash")
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


def coaccess_graph(retriever, key_of: dict) -> dict[tuple[str, str], float]:
    """(block key, block key) -> weight: the item-kNN retriever's similarity of every pair of
    items in key_of (item id -> its block key) that its neighbour table links."""
    graph = {}
    for i, ki in key_of.items():
        row = retriever.index.get(int(i))
        if row is None:
            continue
        for j, w in zip(retriever.neighbours[row], retriever.sims[row]):
            kj = key_of.get(int(retriever.item_ids[j])) if j >= 0 else None
            if kj is not None and kj != ki and w > 0:
                graph[(ki, kj)] = max(graph.get((ki, kj), 0.0), float(w))
    return graph


def place(name: str, *, keys, lengths, embeddings, num_shards: int, edges=None) -> np.ndarray:
    """Shard index of every block (arrays in the same order as keys; edges: the co-access graph
    over those indices, for `coaccess`)."""
    if name == "similarity":
        return similarity_placement(embeddings, lengths, num_shards)
    if name == "coaccess":
        if edges is None:
            raise ValueError("coaccess placement needs the items' co-access graph: Engine(coaccess=retriever) "
                             "(the item-kNN retriever's similarities)")
        return coaccess_placement(lengths, edges, num_shards)
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
