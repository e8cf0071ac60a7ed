"""Scaling of the sharded item store: TTFT and remote bytes vs device count and catalog size, for
each placement (coaccess, similarity, hash), hot-item replication budget and scheduler (affinity,
round-robin), in one run.

python launch/bench_scaling.py --device_counts=1,2,4,8 --catalog_scales=1,10,100 \
    --output_json=bench_out/scaling.json
Catalogs: the real ML-100k items (scale 1) and synthetic ones of scale x k (each real item plus
k - 1 variants: the same genres and year, the title numbered), all with the users' real histories.
Candidates (`--candidates`): the item-kNN retriever's top-K of the test users' histories
(`retrieved`, default; fitted on the training split; at scale > 1 the variants, which nobody
rated, are never retrieved), or the target + `--negatives` over the whole catalog (`sampled`). The
co-access log of the coaccess placement and of replication: the retriever's top-K for the
training histories (`ItemKNN.coaccess_requests`). Model: a small random config (`--layers`,
`--hidden`; the real tokenizer), so a x100 catalog encodes in minutes on a CPU. The whole catalog
is encoded once per scale; each (devices, placement, replication) re-places the same blocks; each
scheduler then serves the same requests (warm pass, then a timed pass). Runs in one process: CPU
devices are simulated up to the largest device count.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.data.movielens import NEGATIVES  # noqa: E402

_DEVICES = flags.DEFINE_list("device_counts", ["1", "2", "4", "8"], "Items-shard counts to measure.")
_SCALES = flags.DEFINE_list("catalog_scales", ["1", "10", "100"], "Catalog sizes as multiples of ML-100k's.")
_REQUESTS = flags.DEFINE_integer("num_requests", 40, "Requests per configuration (distinct users).")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates per request.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items per prompt.")
_CAND_SRC = flags.DEFINE_enum("candidates", "retrieved", ["retrieved", "sampled"], "Candidates: the item-kNN "
                               "retriever's top-K (retrieved) or the target + --negatives (sampled).")
_NEG = flags.DEFINE_enum("negatives", "retrieval", list(NEGATIVES), "Negative sampling (--candidates=sampled).")
_PLACEMENTS = flags.DEFINE_list("placements", ["coaccess", "similarity", "hash"], "Placements to measure.")
_REPLICATE = flags.DEFINE_list("replicate", ["0", "0.1"], "Hot-item replication budgets to measure (fractions "
                               "of a shard's item tokens; > 0 only on more than one device).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers of the small model.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden size of the small model (head dim 32; KV 512 B/token "
                               "at the defaults: a x100 catalog is ~1.7 GB).")
_MODE = flags.DEFINE_string("mode", "rcllm", "Block mode served.")
_FETCH = flags.DEFINE_list("fetch", ["exact"], "Remote fetch paths to measure: exact (compact device-to-device "
                           "buffers) and/or collective (the whole-mesh reduce-scatter).")
_OUT = flags.DEFINE_string("output_json", "bench_out/scaling.json", "Where to write the JSON.")


def _timed_rows(eng, reqs, prompts, n: int) -> list[tuple[str, list]]:
    """Each scheduler's results over the requests on `eng` (a warm pass compiles, then the timed one)."""
    from rcllm_jax.serve.scheduler import Scheduler
    out = []
    for sched in ("affinity", "round_robin"):
        for _timed in (False, True):  # warm pass (compiles), then the timed one
            eng.reset_caches()
            route = Scheduler(n, sched).route
            res = []
            for r, p in zip(reqs, prompts):
                eng.update_user(r.user_id, p)
                res.append(eng.rank(p, _MODE.value, user_id=r.user_id, shard=route(eng.shard_bytes(r.candidates))))
        out.append((sched, res))
    return out


def _row(res, base: dict, st: dict, n: int) -> dict:
    """One grid point's figures: TTFT, locality, shard loads, replication."""
    import numpy as np
    loads = np.asarray(st["shard_tokens"])
    local = sum(x.local_item_bytes for x in res)
    remote = sum(x.remote_item_bytes for x in res)
    return {**base, "ttft_p50_s": float(np.median([x.ttft_s for x in res])),
            "ttft_p99_s": float(np.percentile([x.ttft_s for x in res], 99)),
            "local_fraction": local / max(1, local + remote),
            "remote_blocks_per_request": float(np.mean([x.remote_item_blocks for x in res])),
            "remote_bytes_per_request": float(np.mean([x.remote_item_bytes for x in res])),
            "max_over_mean_load": float(loads.max() / max(loads.mean(), 1)),
            "replicated_item_tokens": st["replicated_item_tokens"],
            "max_shard_tokens_over_mean": float((loads.max() + st["replicated_item_tokens"])
                                                / max(st["item_tokens"] / n, 1))}


def _catalog_rows(params, cfg, tok, base_ds, scale: int, counts) -> tuple[list, object, int]:
    """Every (devices, placement, budget, fetch, scheduler) point of one catalog scale: (rows, the
    one-device engine, the co-access log's length)."""
    import jax

    from rcllm_jax.data.movielens import LeaveOneOut, scaled_catalog
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.parallel.mesh import MeshSpec, make_mesh
    from rcllm_jax.retrieval import fit_before
    t0 = time.perf_counter()
    ds = scaled_catalog(base_ds, scale)
    split = LeaveOneOut(ds)
    retriever = fit_before(split, 2)
    log = retriever.coaccess_requests([split.train_sequence(u) for u in split.users], k=_CANDS.value)
    builder = PromptBuilder(tok, ds.items, history_len=_HIST.value)
    pick = (dict(retriever=retriever) if _CAND_SRC.value == "retrieved" else dict(negatives=_NEG.value))
    reqs = list(eval_requests(split, num_candidates=_CANDS.value, seed=0, num_users=_REQUESTS.value, **pick))
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    one = Engine(params, cfg, builder, item_ids=sorted(ds.items), user_pages=256, prefix_pages=1,
                 max_candidates=_CANDS.value, mesh=make_mesh(MeshSpec(1), devices=jax.devices()[:1]))
    one.build_store()
    build_s = time.perf_counter() - t0
    logging.info("catalog x%d: %d items, %d blocks encoded in %.1fs", scale, len(ds.items),
                 one.stats()["item_blocks"], build_s)
    rows = []
    budgets = sorted({float(x) for x in _REPLICATE.value})
    for n in counts:
        for placement, budget, fetch in itertools.product(_PLACEMENTS.value, budgets, _FETCH.value):
            if n == 1 and budget:
                continue  # one device holds everything: nothing to replicate
            eng = Engine(params, cfg, builder, item_ids=sorted(ds.items), user_pages=256, prefix_pages=1,
                         max_candidates=_CANDS.value, mesh=make_mesh(MeshSpec(n)), placement=placement,
                         replicate=budget, coaccess=log, fingerprint=one.fingerprint, exact_fetch=fetch == "exact")
            t1 = time.perf_counter()
            eng.copy_blocks_from(one)  # placed and laid out on this mesh, nothing re-encoded
            place_s = time.perf_counter() - t1
            st = eng.stats()
            for sched, res in _timed_rows(eng, reqs, prompts, n):
                rows.append(_row(res, {"catalog_scale": scale, "catalog_items": len(ds.items), "devices": n,
                                       "placement": placement, "replicate": budget, "fetch": fetch,
                                       "scheduler": sched}, st, n) | {"placement_s": place_s,
                                                                       "catalog_build_s": build_s})
                r_ = rows[-1]
                print(f"x{scale:<4} {len(ds.items):>7} items  {n} dev  {placement:<10} r={budget:<4g} {fetch:<10} "
                      f"{sched:<11} "
                      f"ttft p50 {r_['ttft_p50_s'] * 1e3:7.1f} ms  local {r_['local_fraction']:.3f}  "
                      f"remote {r_['remote_blocks_per_request']:5.2f} blocks {r_['remote_bytes_per_request'] / 1e3:8.1f} KB"
                      f"  load max/mean {r_['max_over_mean_load']:.3f}", flush=True)
    return rows, one, len(log)


def main(argv):
    del argv
    from rcllm_jax.parallel.mesh import simulate_cpu_devices
    counts = sorted(int(x) for x in _DEVICES.value)
    note = simulate_cpu_devices(max(counts))
    if note:
        logging.info(note)
    import jax

    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.model import ModelConfig, init_params, load_model

    tok = load_model(with_tokenizer=True).tokenizer
    h = _HIDDEN.value
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=h, intermediate_size=2 * h,
                      num_layers=_LAYERS.value, num_heads=h // 32, num_kv_heads=max(1, h // 64), head_dim=32,
                      rope_theta=10000.0, max_position=4096)
    params = init_params(cfg, jax.random.key(0), scale=0.1)
    base = load_dataset("ml-100k")
    rows = []
    for scale in (int(x) for x in _SCALES.value):
        got, one, n_log = _catalog_rows(params, cfg, tok, base, scale, counts)
        rows += got
    targets = remote_ratios(rows)
    for t in targets:
        print(f"x{t['catalog_scale']} {t['devices']} dev: remote bytes/request {t['best']} "
              f"{t['best_remote_bytes'] / 1e3:.1f} KB; hash/round_robin {_ratio(t['hash_round_robin_ratio'])}, "
              f"hash/affinity {_ratio(t['hash_affinity_ratio'])}")
    config = {"model": f"random small config: {_LAYERS.value} layers, hidden {h}, {cfg.num_kv_heads} kv heads",
              "kv_bytes_per_token": one.kv_bytes_per_token, "num_requests": _REQUESTS.value,
              "num_candidates": _CANDS.value, "history_len": _HIST.value, "candidates": _CAND_SRC.value,
              "negatives": _NEG.value if _CAND_SRC.value == "sampled" else None,
              "coaccess_log_requests": n_log, "remote_ratios": targets, "argv": sys.argv[1:],
              "mode": _MODE.value, "cpu_cores": os.cpu_count(), "simulated_devices": len(jax.devices())}
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    config["plots"] = _plots(Path(str(out.with_suffix("")) + "_plots"), rows)
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2))
    print(f"wrote {out} and {len(config['plots'])} plots")

def _ratio(x) -> str:
    return "nothing remote to compare" if x is None else f"{x:.1f}x more"


def remote_ratios(rows) -> list[dict]:
    """Per (catalog, devices > 1): remote bytes per request of hash placement (no replication) under
    round-robin and under affinity routing, over those of coaccess with the largest replication
    budget measured under affinity routing (the issue's target figures)."""
    key = {(r["catalog_scale"], r["devices"], r["placement"], r["replicate"], r["scheduler"]): r for r in rows}
    out = []
    for scale, n in sorted({(r["catalog_scale"], r["devices"]) for r in rows if r["devices"] > 1}):
        budgets = sorted(r["replicate"] for r in rows
                         if (r["catalog_scale"], r["devices"], r["placement"]) == (scale, n, "coaccess"))
        hr, ha = key.get((scale, n, "hash", 0.0, "round_robin")), key.get((scale, n, "hash", 0.0, "affinity"))
        best = key.get((scale, n, "coaccess", budgets[-1], "affinity")) if budgets else None
        if hr and ha and best:
            b = best["remote_bytes_per_request"] or None  # None: nothing remote at all (no finite ratio)
            out.append({"catalog_scale": scale, "devices": n, "best": f"coaccess+replicate{budgets[-1]:g}/affinity",
                        "best_remote_bytes": best["remote_bytes_per_request"],
                        "best_local_fraction": best["local_fraction"],
                        "best_max_over_mean_load": best["max_over_mean_load"],
                        "hash_round_robin_ratio": b and hr["remote_bytes_per_request"] / b,
                        "hash_affinity_ratio": b and ha["remote_bytes_per_request"] / b})
    return out


def _plots(out_dir: Path, rows) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    scales = sorted({r["catalog_scale"] for r in rows})
    written = []
    for metric, label, name in (("remote_bytes_per_request", "remote KB per request", "remote_bytes_vs_devices.png"),
                                ("ttft_p50_s", "TTFT p50 (ms)", "ttft_vs_devices.png")):
        fig, axes = plt.subplots(1, len(scales), figsize=(4.2 * len(scales), 3.8), squeeze=False)
        for ax in axes[0]:
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for ax, scale in zip(axes[0], scales):
            lines = sorted({(r["placement"], r["replicate"], r.get("fetch", "")) for r in rows})
            for placement, budget, fetch in lines:
                for sched, style in (("affinity", "-"), ("round_robin", "--")):
                    pts = sorted((r["devices"], r[metric]) for r in rows if r["catalog_scale"] == scale
                                 and (r["placement"], r["replicate"], r.get("fetch", ""), r["scheduler"])
                                 == (placement, budget, fetch, sched))
                    pts = [p for p in pts if p[0] > 1] if budget else pts
                    factor = 1e-3 if metric.endswith("bytes_per_request") else 1e3
                    ax.plot([p[0] for p in pts], [p[1] * factor for p in pts], style, marker="o",
                            label=f"{placement}{f'+r{budget:g}' if budget else ''} / {sched}"
                                  + (f" / {fetch}" if len(_FETCH.value) > 1 else ""))
            ax.set(title=f"catalog x{scale}", xlabel="items-shards (devices)", ylabel=label, xscale="log", )
            ax.minorticks_off()
            ax.set_xticks(sorted({r["devices"] for r in rows}), labels=[str(d) for d in sorted({r["devices"] for r in rows})])
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(f"{out_dir.name}/{name}")  # relative to the JSON's folder
    return written


if __name__ == "__main__":
    app.run(main)
