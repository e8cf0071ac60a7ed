"""Recommendations for a few users: the product's main job, from the command line.

python launch/recommend.py --user_id=1,2,3
With no other flag: fetches the default model (SmolLM2-135M-Instruct) and MovieLens-100k, restores
the item-cache snapshot for this model (builds and saves it on the first run, as serve.py does),
and for each user: the item-kNN retriever proposes --num_candidates items from the whole catalog,
the served ranking head reranks them in one cached prefill (rcllm mode), and the top --top_k are
printed with titles and scores, next to what full prefill of the same prompt gives and how long
each took (TTFT, measured on a second run of the same request: the first one compiles).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement)
from rcllm_jax.settings import CatalogSettings, EngineSettings, ModelSettings, define_flags, read  # noqa: E402

define_flags(ModelSettings, CatalogSettings)
define_flags(EngineSettings, exclude=("max_candidates", "user_cache_mb", "user_cache_pages", "prefix_cache_pages",
                                      "rebuild_on_damage"))
_USERS = flags.DEFINE_list("user_id", ["1"], "Users to recommend for (as the catalog names them; MovieLens: 1..943).")
_NUM_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates the retriever proposes per user.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Recommendations printed per user.")
_COMPARE = flags.DEFINE_string("compare", "full", "Mode run on the same prompts for comparison ('' for none).")


def _title(item) -> str:
    if item.text is not None:  # a catalog directory's item: its templated text
        return item.text
    return f"{item.title} ({item.year})" if item.year else item.title


def _timed(rec, user, history, candidates):
    """(recommendation, TTFT of a second run of the same request)."""
    rec.recommend(user, history, candidates)
    second = rec.recommend(user, history, candidates)
    return second, second.result.ttft_s


def main(argv):
    del argv
    model, catalog, eng = read(ModelSettings, CatalogSettings, EngineSettings)
    from rcllm_jax.engine.engine import MODES
    for m in filter(None, (eng.mode, _COMPARE.value)):
        if m not in MODES:
            raise app.UsageError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    users = list(_USERS.value)
    mesh, layout = dist_cli.setup()
    from rcllm_jax.data.catalog import CatalogError
    from rcllm_jax.engine.ranking_head import HeadError
    from rcllm_jax.recommender import Recommender, open_served

    t0 = time.perf_counter()
    try:
        eng = dataclasses.replace(eng, prefix_cache_pages=256 if "prefix" in (eng.mode, _COMPARE.value) else 1,
                                  user_cache_pages=64 * len(users))  # room for these users' history prefixes
        served = open_served(model, catalog, eng, layout, mesh=mesh)
    except HeadError as e:
        raise app.UsageError(f"the ranking head does not fit --model ({e}): pass --head=label or a "
                             "--ranking_head trained for it") from None
    except CatalogError as e:
        raise app.UsageError(str(e)) from None
    ds, engine, rec = served.dataset, served.engine, served.recommender
    unknown = [u for u in users if ds.user_of(u) is None]
    if unknown:
        some = ", ".join(repr(ds.user_key(u)) for u in sorted(ds.sequences)[:3])
        raise app.UsageError(f"unknown user {unknown[0]!r} (this catalog's users are e.g. {some})")
    for note in served.notes:
        print(note)
    print(f"ready in {time.perf_counter() - t0:.1f}s: {len(served.item_ids)} items cached "
          f"({engine.stats()['item_bytes'] / 2**20:.0f} MiB of KV)\n")
    other = Recommender(engine, rec.retriever, _COMPARE.value) if _COMPARE.value else None
    for u in users:
        history = list(ds.sequences[ds.user_of(u)])
        t1 = time.perf_counter()
        try:
            cands = rec.candidates(history, _NUM_CANDS.value)
        except ValueError as e:  # the user has seen (nearly) the whole catalog
            print(f"user {u}: {e}\n")
            continue
        retrieve_ms = 1e3 * (time.perf_counter() - t1)
        engine.update_user(u, engine.builder.build(history, cands))  # event time: the history's KV, once
        got, ttft = _timed(rec, u, history, cands)
        res = got.result
        recent = "; ".join(_title(ds.items[i]) for i in history[-3:])
        print(f"user {u}: {len(history)} ratings, latest: {recent}")
        print(f"  {len(cands)} candidates retrieved from {len(served.item_ids)} items in {retrieve_ms:.1f} ms; "
              f"reranked in {eng.mode} mode:")
        print(f"  {'rank':>4} {'item':>5} {'score':>8}  title")
        for r, (item, score) in enumerate(zip(got.ranking[:_TOP_K.value], got.scores[:_TOP_K.value]), 1):
            print(f"  {r:4d} {str(ds.items[item].id):>5} {score:8.3f}  {_title(ds.items[item])}")
        line = (f"  TTFT {eng.mode} {1e3 * ttft:.1f} ms ({res.computed_tokens} of {res.prompt_tokens} prompt "
                f"tokens computed, {res.cache_hit_tokens} from caches)")
        if other is not None:
            ref, ref_ttft = _timed(other, u, history, cands)
            k = min(_TOP_K.value, len(cands))
            overlap = len(set(got.ranking[:k]) & set(ref.ranking[:k]))
            line += (f" vs {_COMPARE.value} {1e3 * ref_ttft:.1f} ms: {ref_ttft / ttft:.1f}x lower; "
                     f"top-{k} overlap {overlap}/{k}, same top-1: {'yes' if got.ranking[0] == ref.ranking[0] else 'no'}")
        print(line + "\n")


if __name__ == "__main__":
    app.run(main)
