"""Serve ranked recommendations over HTTP.

python launch/serve.py --mesh=items:4
With no other flag: fetches the default model (SmolLM2-135M-Instruct) and MovieLens-100k, restores
the item-cache snapshot for this model (or builds and saves it once), restores the saved user
store, and serves on 127.0.0.1:8000 (README: API and curl examples). On a CPU-only machine with
fewer devices than --mesh asks for, it simulates them and says so in its log. SIGTERM or Ctrl-C:
stops accepting, answers every queued request, saves the user store (a restart restores it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.dist import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.serve.scheduler import SCHEDULERS  # noqa: E402

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free port; the log says which).")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapter directory for --model.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_DATASET = flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "Catalog and user histories.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: fetch ml-100k).")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Item-cache snapshot (default: <cache>/snapshots/<model "
                            "fingerprint>-<dataset>); built and saved there when absent.")
_USERS_DIR = flags.DEFINE_string("users_dir", None, "User-store snapshot (default: <snapshot_dir>-users).")
_MODE = flags.DEFINE_string("mode", "rcllm", "Prefill mode: rcllm, stitch, sink, deviation, full, prefix.")
_SCHED = flags.DEFINE_enum("scheduler", "affinity", list(SCHEDULERS), "Shard assignment policy.")
_QUEUE = flags.DEFINE_integer("max_queue", 256, "Requests waiting at most (beyond: 503 + Retry-After).")
_WINDOW = flags.DEFINE_integer("window", 32, "Requests per scheduling window.")
_HEAD = flags.DEFINE_enum("head", "slot", ["label", "slot"], "How candidates are scored: score slots read by a "
                          "trained head (--ranking_head; default: the head shipped for the default model), or the "
                          "answer's label logits (any model, no head).")
_HEAD_PATH = flags.DEFINE_string("ranking_head", None, "Slot-head directory (default with --head=slot: the shipped "
                                 "rcllm_jax/assets/slot_head, trained for the default model).")
_HIST = flags.DEFINE_integer("history_len", 20, "History items in a prompt (the most recent).")
_MAX_CANDS = flags.DEFINE_integer("max_candidates", 52, "Most candidates per request (52: single-token labels).")
_NUM_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates the retriever proposes for a request that "
                                  "sends none (its num_candidates field overrides).")
_USER_PAGES = flags.DEFINE_integer("user_cache_pages", 512, "User-store budget in 16-token pages (replicated "
                                   "on every device).")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Serve only the first N catalog items (0 = all; smoke tests).")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 60.0, "Answer 504 after this long.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 64 * 1024, "Larger request bodies get 413.")
_WARM = flags.DEFINE_bool("warmup", True, "Compile typical requests' shapes on every shard before serving.")
_WARM_N = flags.DEFINE_integer("warmup_prompts", 6, "Prompts (distinct history-length buckets) in the warm-up.")


def _warmup_prompts(builder, ds, item_ids, n: int):
    """Up to n prompts of typical size (20 candidates, real histories) whose history prefixes fall
    in different shape buckets: the compiles real traffic would otherwise pay for."""
    from rcllm_jax.buckets import bucket
    out, seen = [], set()
    for user, seq in ds.sequences.items():
        if len(out) >= n:
            break
        for k in (20, 10, 5, 1):
            try:
                p = builder.build(seq, item_ids[:min(k, _MAX_CANDS.value, len(item_ids))])
            except ValueError:
                continue
            key = bucket(len(p.blocks[0].tokens) + len(p.blocks[1].tokens), 16)
            if key not in seen:
                seen.add(key)
                out.append(p)
            break
    return out or [builder.build([], item_ids[:1])]


def main(argv):
    del argv
    mesh = dist_cli.setup()
    import jax

    from rcllm_jax.cache import snapshot
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import MODES, Engine
    from rcllm_jax.fetch import cache_dir
    from rcllm_jax.model import load_model
    from rcllm_jax.serve.http import make_server
    from rcllm_jax.serve.scheduler import Scheduler
    from rcllm_jax.serve.service import RecommenderService

    if _MODE.value not in MODES:
        raise app.UsageError(f"unknown --mode {_MODE.value!r}; modes: {', '.join(MODES)}")
    if jax.process_count() > 1:
        raise app.UsageError("serve.py runs as one process (multi-host serving is not implemented; "
                             "launch/build_cache.py and bench.py take the multi-host flags)")
    t0 = time.perf_counter()
    ds = load_dataset(_DATASET.value, _DATA_DIR.value)
    item_ids = sorted(ds.items)[:_MAX_ITEMS.value or None]
    items = {i: ds.items[i] for i in item_ids}
    model = load_model(_MODEL.value, dtype=_DTYPE.value, adapter=_ADAPTER.value)
    from rcllm_jax.engine.slot_head import ranking_head
    head = ranking_head(_HEAD.value, _HEAD_PATH.value)
    builder = PromptBuilder(model.tokenizer, ds.items, history_len=_HIST.value, max_prompt_tokens=model.cfg.max_position,
                            head=_HEAD.value)
    from rcllm_jax.engine.slot_head import HeadError
    try:
        engine = Engine(model.params, model.cfg, builder, item_ids=item_ids, user_pages=_USER_PAGES.value,
                        prefix_pages=256 if _MODE.value == "prefix" else 1, max_candidates=_MAX_CANDS.value,
                        mesh=mesh, placement=dist_cli.PLACEMENT.value, head=head)
    except HeadError as e:
        raise app.UsageError(f"the ranking head {_HEAD_PATH.value or 'shipped with rcllm_jax'} was trained for other "
                             f"weights than --model ({e}): train one (launch/train_head.py --model=...) and pass "
                             "--ranking_head, or serve with --head=label") from None
    snap = _SNAP.value or str(cache_dir() / "snapshots" / f"{engine.fingerprint[:16]}-{ds.name}")
    users_dir = _USERS_DIR.value or snap.rstrip("/") + "-users"
    saved = snapshot.latest_meta(snap)
    if saved is not None:
        engine.restore(snap)
        logging.info("restored item caches from %s", snap)
    engine.build_store()  # encodes only what the snapshot lacked (everything on the first start)
    st = engine.stats()
    if saved is None or st["item_blocks"] + st["glue_blocks"] > len(saved[1]["blocks"]):
        engine.save(snap)
        logging.info("saved item caches to %s", snap)
    if _WARM.value:  # compile the common shapes on every shard before the first user waits for them
        t1 = time.perf_counter()
        probes = _warmup_prompts(builder, ds, item_ids, _WARM_N.value)
        for s in range(engine.num_shards):
            for j, probe in enumerate(probes):
                engine.rank(probe, _MODE.value, user_id=-1 - j, shard=s)
        engine.reset_caches()
        logging.info("warmed up %d shards x %d prompt shapes in %.1fs", engine.num_shards, len(probes),
                     time.perf_counter() - t1)
    from rcllm_jax.retrieval import load_or_fit
    retriever, how = load_or_fit(Path(snap) / "retriever.npz", [ds.sequences[u] for u in sorted(ds.sequences)],
                                 item_ids)
    logging.info("retriever (item-kNN over the served histories): %s", how)
    histories = {u: list(s) for u, s in ds.sequences.items()}
    saved_histories = engine.restore_users(users_dir)
    histories.update(saved_histories)
    logging.info("restored %d cached user prefixes and %d histories from %s", engine.stats()["users_cached"],
                 len(saved_histories), users_dir)
    service = RecommenderService(engine, items, histories, mode=_MODE.value,
                                 scheduler=Scheduler(engine.num_shards, _SCHED.value, _QUEUE.value, _WINDOW.value),
                                 max_candidates=_MAX_CANDS.value, request_timeout_s=_TIMEOUT.value,
                                 retriever=retriever, num_candidates=_NUM_CANDS.value)
    service.start()
    server = make_server(service, _HOST.value, _PORT.value, _MAX_BODY.value)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port} ({len(items)} items, {_MODE.value} mode, {mesh.shape['items']} "
          f"items-shards, {_SCHED.value} scheduler; ready in {time.perf_counter() - t0:.1f}s)", flush=True)
    stop.wait()
    logging.info("stopping: draining %d queued requests", len(service.scheduler))
    server.shutdown()  # no new connections
    service.stop()  # every queued request answered
    server.server_close()  # in-flight handlers finish writing
    step = engine.save_users(users_dir, service.histories)
    print(f"saved {engine.stats()['users_cached']} user prefixes to {users_dir} (step {step}); bye", flush=True)


if __name__ == "__main__":
    app.run(main)
