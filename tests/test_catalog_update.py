"""Incremental catalog updates: `placement.extend` by hand, `Engine.update_store` against a full
build of the edited catalog, and a live server taking `build_cache.py --update`'s step through
POST /admin/reload while requests keep coming."""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from test_catalog import ROOT, item_key, synthetic_rows, write_catalog
from rcllm_jax.parallel import placement


def test_extend_places_only_new_blocks_by_hand():
    """Placed blocks stay; a new block goes to the shard whose placed blocks' mean embedding is
    nearest, unless that shard would pass the capacity of the grown store (ceil(1.05 x mean));
    `hash` follows the content hash, then the next shard."""
    placed = [0, 0, 1, 1, placement.REPLICATED]
    emb = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 1]], np.float64)
    new_emb = np.array([[0.05, 1.0], [1.0, 0.02]])
    got = placement.extend("similarity", keys=["a", "b"], lengths=[10, 10], embeddings=new_emb,
                           placed_shards=placed, placed_lengths=[10, 10, 10, 10, 10], placed_embeddings=emb,
                           num_shards=2)
    assert got.tolist() == [1, 0]
    # shard 1 is full (capacity ceil(1.05 * 60 / 2) = 32): both new blocks near shard 1 go where there is room
    got = placement.extend("similarity", keys=["a", "b"], lengths=[12, 10], embeddings=[[0, 1], [0, 1]],
                           placed_shards=[0, 1, 1], placed_lengths=[8, 15, 15], placed_embeddings=[[1, 0], [0, 1],
                                                                                                  [0, 1]],
                           num_shards=2)
    assert got.tolist() == [0, 0]
    keys = ["00000000000a", "00000000000b"]  # hashes 10 and 11: shards 0 and 1 of 2
    got = placement.extend("hash", keys=keys, lengths=[5, 5], embeddings=np.zeros((2, 1)), placed_shards=[0, 1],
                           placed_lengths=[5, 5], placed_embeddings=np.zeros((2, 1)), num_shards=2)
    assert got.tolist() == [0, 1]


def _edit(items, rows):
    """The catalog a day later: 2 items gone, 1 retitled, 3 new (with interactions)."""
    gone = {item_key(5), item_key(6)}
    items = [dict(x, title="Widget 7 (2025 edition)") if x["id"] == item_key(7) else dict(x)
             for x in items if x["id"] not in gone]
    new = [{"id": f"new-ß-{j}", "title": f"Gadget {j}", "brand": "Acme", "category": "audio"} for j in range(3)]
    rows = [r for r in rows if r["item"] not in gone]
    rows += [{"user": "user-ü-0", "item": x["id"], "timestamp": "1900000000"} for x in new]
    return items + new, rows


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    items, rows = synthetic_rows(n_items=160, n_users=40)
    root = tmp_path_factory.mktemp("catalogs")
    return (write_catalog(root / "before", items, rows), write_catalog(root / "after", *_edit(items, rows)),
            items)


def _engine(catalog_dir, smollm2, mesh):
    from rcllm_jax.data.catalog import prompt_builder, read_catalog
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import ModelConfig, init_params
    from rcllm_jax.settings import CatalogSettings
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    ds = read_catalog(catalog_dir)
    builder = prompt_builder(smollm2.tokenizer, ds, CatalogSettings(catalog=str(catalog_dir), history_len=4))
    eng = Engine(init_params(cfg, jax.random.key(3), scale=0.1), cfg, builder, item_ids=sorted(ds.items),
                 user_pages=16, prefix_pages=1, max_candidates=8, mesh=mesh)
    return eng, ds


def test_update_store_encodes_only_what_changed(catalogs, smollm2, tmp_path):
    """Restore a snapshot of the catalog and update it to the edited catalog: only the new and
    retitled items are encoded, the removed and retitled-away blocks dropped, every kept block
    stays on its shard, and the store then holds exactly the blocks, with the same KV, as a full
    build of the edited catalog; the saved step restores with its layout."""
    from rcllm_jax.parallel.mesh import MeshSpec, make_mesh
    before, after, _ = catalogs
    mesh = make_mesh(MeshSpec(2))
    old, _ = _engine(before, smollm2, mesh)
    old.build_store()
    old.save(tmp_path / "snap")
    old_shards = {k: e.shard for k, e in old.store.entries.items()}

    eng, ds = _engine(after, smollm2, mesh)
    eng.restore(tmp_path / "snap")
    report = eng.update_store()
    assert (report["added"], report["dropped"], report["moved"]) == (4, 3, 0)  # 3 new + 1 retitled; 2 gone + 1
    assert sum(p["blocks"] for p in report["passes"]) == 4
    kept = set(old_shards) & set(eng.store.entries)
    assert len(kept) == len(old_shards) - 3
    assert all(eng.store.entries[k].shard == old_shards[k] for k in kept)

    full, _ = _engine(after, smollm2, mesh)
    full.build_store()
    got, want = eng.store.host_blocks(), full.store.host_blocks()
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k][0], want[k][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-5, atol=1e-6)
    step = eng.save(tmp_path / "snap")
    again, _ = _engine(after, smollm2, mesh)
    again.restore(tmp_path / "snap", step=step)
    assert {k: e.shard for k, e in again.store.entries.items()} == {k: e.shard for k, e in eng.store.entries.items()}
    new = ds.item_of("new-ß-0")
    cands = [new, ds.item_of(item_key(7)), ds.item_of(item_key(8))]
    res = eng.rank(eng.builder.build(list(ds.sequences[1])[:4], cands), "rcllm", user_id="u")
    assert res.local_item_blocks + res.remote_item_blocks == 3  # every candidate read from the cache


@pytest.mark.slow
def test_a_server_takes_an_updated_step_without_a_restart(catalogs, smollm2, tmp_path):
    """build_cache.py -> serve.py -> the catalog edited -> build_cache.py --update (only the changed
    items encoded) -> POST /admin/reload while a client sends requests the whole time: none fails,
    the new items are served, the removed ones are unknown, the server's step is the new one."""
    from urllib.parse import quote

    from test_serve import Server, http_call, tiny_model
    before, after, _ = catalogs
    live = tmp_path / "catalog"
    live.mkdir()
    for f in before.iterdir():
        (live / f.name).write_bytes(f.read_bytes())
    tiny = tiny_model(tmp_path / "model", smollm2.tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    common = [f"--catalog={live}", f"--model={tiny}", "--head=label", f"--snapshot_dir={tmp_path / 'snap'}",
              "--max_candidates=8", "--mesh=items:2"]

    def build(*extra):
        r = subprocess.run([sys.executable, str(ROOT / "launch" / "build_cache.py"), *common, *extra], env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout[:r.stdout.rindex("}") + 1])

    assert build()["step"] == 1
    srv = Server([*common, "--history_len=4", "--port=0", "--nowarmup", "--user_cache_pages=64",
                  "--calibration_requests=0", f"--state_db={tmp_path / 'state.sqlite3'}"], env)
    failures, answered, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            code, out = http_call(srv.url + "/v1/recommend",
                                  {"user_id": "user-ü-1", "candidates": [item_key(i) for i in (8, 9, 10, 11)]})
            (answered if code == 200 else failures).append((code, out))
    try:
        code, out = http_call(srv.url + "/admin/reload", {})  # the same step and catalog: nothing changes
        assert code == 200 and (out["step"], out["added"], out["removed"]) == (1, 0, 0), out
        for f in after.iterdir():
            (live / f.name).write_bytes(f.read_bytes())
        code, out = http_call(srv.url + "/admin/reload", {})
        assert code == 409 and "nothing was changed" in out["error"] and "--update" in out["error"], out
        up = build("--update")
        assert up["step"] == 2 and up["update"] == {"kept": up["update"]["kept"], "added": 4, "dropped": 3,
                                                     "moved": 0}
        t = threading.Thread(target=client)
        t.start()
        while len(answered) < 2 and not failures:
            stop.wait(0.2)
        code, out = http_call(srv.url + "/admin/reload", {})
        n = len(answered)
        while len(answered) < n + 2 and not failures:
            stop.wait(0.2)
        stop.set()
        t.join(300)
        assert code == 200 and out["step"] == 2 and (out["added"], out["removed"]) == (3, 2), out
        assert not failures and len(answered) >= 4, failures[:3]
        code, item = http_call(srv.url + "/v1/items/new-%C3%9F-1")
        assert code == 200 and item["title"] == "Gadget 1", item
        assert http_call(srv.url + "/v1/items/" + quote(item_key(5)))[0] == 404
        code, out = http_call(srv.url + "/v1/recommend", {"user_id": "user-ü-1",
                                                          "candidates": ["new-ß-0", item_key(7), item_key(9)]})
        assert code == 200 and out["cache"]["local_item_blocks"] + out["cache"]["remote_item_blocks"] == 3, out
    finally:
        stop.set()
        assert srv.stop()[0] == 0
