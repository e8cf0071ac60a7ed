"""Any catalog (rcllm_jax/data/catalog.py): a synthetic non-movie catalog made here (string ids
with dashes and unicode, three text fields, 2000 items, timestamped interactions) read from JSONL,
CSV, Parquet and RecBole files alike; every kind of bad catalog refused naming the file, the line
and the field, with nothing on disk changed; MovieLens-100k written in the generic format ranks
exactly as the built-in reader's; and the catalog end to end through build_cache.py, serve.py,
recommend.py and bench.py."""

import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rcllm_jax.data.catalog import CatalogError, read_catalog

ROOT = Path(__file__).resolve().parents[1]
BRANDS = ("Müller", "Åkesson & Co", "Zhōu", "Acme")
CATEGORIES = ("kitchen", "garden", "toys", "books", "audio")
TOML = 'name = "shop"\nitem_template = "{title} by {brand} ({category})"\ngenres = "category"\n'


def item_key(i: int) -> str:
    return f"sku-{i:04d}-{'αβγ'[i % 3]}"


def synthetic_rows(n_items: int = 2000, n_users: int = 150, seed: int = 0):
    """(items, interactions): users mostly buy within two categories, in time order."""
    rng = np.random.default_rng(seed)
    items = [{"id": item_key(i), "title": f"Widget {i} ✓", "brand": BRANDS[i % len(BRANDS)],
              "category": CATEGORIES[(i * 7) % len(CATEGORIES)]} for i in range(n_items)]
    by_cat = {c: [it["id"] for it in items if it["category"] == c] for c in CATEGORIES}
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    rows = []
    for u in range(n_users):
        cats = rng.choice(CATEGORIES, size=2, replace=False)
        for k in range(int(rng.integers(4, 12))):
            pool = by_cat[cats[int(rng.random() < 0.3)]][:60]
            when = start + datetime.timedelta(days=u, hours=k)
            ts = when.isoformat() if k % 2 else str(int(when.timestamp()))  # ISO 8601 or epoch seconds
            rows.append({"user": f"user-ü-{u}", "item": pool[int(rng.integers(len(pool)))], "timestamp": ts})
    return items, rows


def write_catalog(d: Path, items, rows, items_format: str = "jsonl", inter_format: str = "csv", toml: str = TOML):
    d.mkdir(parents=True, exist_ok=True)
    (d / "catalog.toml").write_text(toml, encoding="utf-8")
    if items_format == "jsonl":
        (d / "items.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items),
                                       encoding="utf-8")
    elif items_format == "csv":
        with open(d / "items.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(items[0]))
            w.writeheader()
            w.writerows(items)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(items), d / "items.parquet")
    if inter_format == "csv":
        with open(d / "interactions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif inter_format == "inter":
        (d / "shop.inter").write_text("user:token\titem:token\ttimestamp:float\n" + "".join(
            f"{r['user']}\t{r['item']}\t{_seconds(r['timestamp'])}\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), d / "interactions.parquet")
    return d


def _seconds(ts: str) -> float:
    return float(ts) if ts.isdigit() else datetime.datetime.fromisoformat(ts).timestamp()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    items, rows = synthetic_rows()
    return write_catalog(tmp_path_factory.mktemp("shop") / "shop", items, rows), items, rows


def test_a_synthetic_catalog_is_read_with_its_own_ids(shop):
    d, items, rows = shop
    ds = read_catalog(d)
    assert ds.name == "shop" and len(ds.items) == 2000
    first = ds.items[ds.item_of(item_key(5))]
    assert first.id == item_key(5) and first.text == f"Widget 5 ✓ by {BRANDS[1]} ({CATEGORIES[0]})"
    assert first.genres == (CATEGORIES[0],) and first.title == "Widget 5 ✓"
    # users and their chronological sequences, by the catalog's ids (ISO and epoch stamps mixed)
    want = {}
    for r in sorted(rows, key=lambda r: (_seconds(r["timestamp"]), ds.item_of(r["item"]))):
        want.setdefault(r["user"], []).append(r["item"])
    got = {ds.user_key(u): [ds.items[i].id for i in s] for u, s in ds.sequences.items()}
    assert got == want
    assert ds.user_of("user-ü-3") is not None and ds.user_of("user-3") is None and ds.item_of("sku-x") is None
    assert ds.item_of(0) is None  # an integer names an item only where the catalog's ids are integers


@pytest.mark.parametrize("items_format, inter_format", [("csv", "parquet"), ("parquet", "inter")])
def test_every_file_format_reads_the_same_catalog(shop, tmp_path, items_format, inter_format):
    d, items, rows = shop
    other = read_catalog(write_catalog(tmp_path / "shop", items, rows, items_format, inter_format))
    ref = read_catalog(d)
    assert other.items == ref.items and other.sequences == ref.sequences and other.user_keys == ref.user_keys


def _bad(tmp_path, items, rows, **kw):
    d = write_catalog(tmp_path / "bad", items, rows, **kw)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir()}
    with pytest.raises(CatalogError) as e:
        read_catalog(d)
    assert before == {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir()}  # nothing changed
    return str(e.value)


def test_bad_catalogs_are_refused_naming_file_line_and_field(tmp_path):
    items, rows = synthetic_rows(n_items=30, n_users=5)
    dup = items + [dict(items[3], title="again")]
    assert f"items.jsonl:31: duplicate item id {item_key(3)!r} (first at " in _bad(tmp_path, dup, rows)
    empty = [dict(items[0], id="  ")] + items[1:]
    assert "items.jsonl:1: field 'id': an id must be a non-empty" in _bad(tmp_path, empty, rows)
    no_id = [{k: v for k, v in x.items() if k != "id"} for x in items]
    assert "items.jsonl:1: no id column 'id'" in _bad(tmp_path, no_id, rows)
    lacking = items[:2] + [{k: v for k, v in items[2].items() if k != "brand"}] + items[3:]
    assert f"items.jsonl:3: item {item_key(2)!r} lacks field 'brand' used by item_template" in _bad(tmp_path, lacking,
                                                                                                      rows)
    assert "interactions.csv:3: field 'item': unknown item 'sku-9999'" in _bad(
        tmp_path, items, rows[:1] + [dict(rows[1], item="sku-9999")] + rows[2:])
    assert "interactions.csv:2: field 'user': an id must be a non-empty" in _bad(
        tmp_path, items, [dict(rows[0], user="")] + rows[1:])
    assert "interactions.csv:4: field 'timestamp': cannot parse timestamp 'yesterday'" in _bad(
        tmp_path, items, rows[:2] + [dict(rows[2], timestamp="yesterday")] + rows[3:])
    assert "interactions.csv:2: no user column 'user'" in _bad(
        tmp_path, items, [{k: v for k, v in r.items() if k != "user"} for r in rows])
    assert "unknown key 'template'" in _bad(tmp_path, items, rows, toml='template = "{title}"\n')
    assert "item_template must be a non-empty string" in _bad(tmp_path, items, rows, toml='name = "x"\n')
    d = write_catalog(tmp_path / "latin", items, rows)
    (d / "items.jsonl").write_bytes((d / "items.jsonl").read_bytes()  # line 2 written in Latin-1
                                    .replace("Widget 1 ✓".encode(), "Widget 1 \u00fc".encode("latin-1")))
    with pytest.raises(CatalogError, match=r"items.jsonl:2: not UTF-8 \(byte 0xfc"):
        read_catalog(d)
    (d / "items.csv").write_text("id\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="expected exactly one items file"):
        read_catalog(d)
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(tmp_path / "absent")


def test_item_texts_are_cut_to_the_catalogs_token_cap(shop, smollm2):
    from rcllm_jax.data.catalog import prompt_builder
    from rcllm_jax.settings import CatalogSettings
    d, items, rows = shop
    ds = read_catalog(d)
    ds.max_item_tokens = 4
    b = prompt_builder(smollm2.tokenizer, ds, CatalogSettings(history_len=3))
    i = ds.item_of(item_key(7))
    cut = b.item_block(i).text.strip()
    assert ds.items[i].text.startswith(cut) and cut != ds.items[i].text and "\ufffd" not in cut
    assert len(smollm2.tokenizer.encode(cut)) <= 4 and cut in b.build([i], [i]).blocks[1].text  # history too


def _movielens_as_catalog(d: Path):
    """ML-100k in the generic format: items.jsonl (id, the reader's display text) and
    interactions.csv, as a team exporting its own copy would write them."""
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.data.prompt import movielens_text
    ds = load_dataset("ml-100k")
    items = [{"id": str(i), "title": movielens_text(it)} for i, it in sorted(ds.items.items())]
    rows = [{"user": str(u), "item": str(i), "timestamp": str(t)}
            for u, s in ds.sequences.items() for t, i in enumerate(s)]
    write_catalog(d, items, rows, toml='name = "ml-100k-generic"\nitem_template = "{title}"\n')
    return ds, read_catalog(d)


def test_movielens_preset_reads_back_as_the_builtin_reader(tmp_path):
    """launch/export_catalog.py (`write_catalog`) writes ML-100k as a catalog directory that reads
    back to the built-in reader's items (ids, titles, prompt texts, genres), users, sequences and times;
    an existing directory is refused, nothing written."""
    from rcllm_jax.data.catalog import write_catalog
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.data.prompt import movielens_text
    ref = load_dataset("ml-100k")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "export_catalog.py"), f"--out={tmp_path / 'ml'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1682 items, 943 users, 100000 interactions" in r.stdout, r.stderr[-2000:]
    gen = read_catalog(tmp_path / "ml")
    assert gen.sequences == ref.sequences and gen.items.keys() == ref.items.keys()
    assert gen.times == ref.times and gen.first_seen() == ref.first_seen()  # the cold slices' new items
    assert all(gen.items[i].text == movielens_text(it) and gen.items[i].title == it.title
               and gen.items[i].genres == it.genres and gen.items[i].id == str(i) for i, it in ref.items.items())
    assert all(gen.user_key(u) == str(u) for u in ref.sequences)
    with pytest.raises(FileExistsError, match="exists"):
        write_catalog(ref, tmp_path / "ml")
    assert sorted(p.name for p in (tmp_path / "ml").iterdir()) == ["catalog.toml", "interactions.csv", "items.jsonl"]


def test_movielens_in_the_generic_format_ranks_identically(smollm2, tmp_path):
    """Same users, items, sequences and prompts as the built-in reader; the retriever proposes the
    same candidates and the engine ranks them the same, score for score."""
    import jax

    from rcllm_jax.data.catalog import prompt_builder
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import ModelConfig, init_params
    from rcllm_jax.recommender import Recommender
    from rcllm_jax.retrieval import ItemKNN
    from rcllm_jax.settings import CatalogSettings
    ref, gen = _movielens_as_catalog(tmp_path / "ml")
    assert sorted(ref.items) == sorted(gen.items) and ref.sequences == gen.sequences
    assert all(gen.items[i].id == str(i) and gen.user_key(u) == str(u) for i in (1, 50) for u in (1, 943))
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)
    params = init_params(cfg, jax.random.key(1), scale=0.1)
    rankings = []
    for ds, builder in ((ref, PromptBuilder(smollm2.tokenizer, ref.items, history_len=5)),
                        (gen, prompt_builder(smollm2.tokenizer, gen, CatalogSettings(history_len=5)))):
        retriever = ItemKNN.fit([ds.sequences[u] for u in sorted(ds.sequences)], sorted(ds.items))
        users = (1, 2, 3)
        cands = {u: retriever.retrieve(ds.sequences[u], 8)[0] for u in users}
        eng = Engine(params, cfg, builder, item_ids=sorted({i for c in cands.values() for i in c}), user_pages=64,
                     prefix_pages=1)
        eng.build_store()
        rec = Recommender(eng, retriever, "rcllm")
        got = [rec.recommend(u, ds.sequences[u], cands[u]) for u in users]
        rankings.append([(r.ranking, builder.build(ds.sequences[u], cands[u]).tokens.tolist(), r.scores)
                         for u, r in zip(users, got)])
    for (r1, t1, s1), (r2, t2, s2) in zip(*rankings):
        assert r1 == r2 and t1 == t2 and np.array_equal(s1, s2)


@pytest.mark.slow
def test_a_catalog_end_to_end(shop, smollm2, tmp_path):
    """build_cache.py --catalog -> serve.py (the snapshot restored; recommend with the catalog's
    string ids, with and without candidates; events; the item endpoint) -> recommend.py ->
    bench.py JSON, on the 2000-item synthetic catalog with a tiny random model."""
    from test_serve import Server, http_call, tiny_model
    d, items, rows = shop
    tiny = tiny_model(tmp_path / "model", smollm2.tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    snap = tmp_path / "snap"
    common = [f"--catalog={d}", f"--model={tiny}", "--head=label", f"--snapshot_dir={snap}"]

    def run(script, *args):
        r = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, (script, r.stderr[-3000:])
        return r

    built = run("build_cache.py", *common, "--max_candidates=20", "--calibrate", "--history_len=4")
    assert "rcllm policy: " in built.stderr and "(calibrated now on 16 requests;" in built.stderr
    ds = read_catalog(d)
    srv = Server([*common, "--history_len=4", "--port=0", "--nowarmup", "--max_candidates=20", "--user_cache_pages=64",
                  f"--state_db={tmp_path / 'state.sqlite3'}"], env)
    try:
        url = srv.url
        assert "restored item caches" in "".join(srv.lines)
        assert "(saved with the snapshot;" in "".join(srv.lines)  # build_cache.py --calibrate's
        user = ds.user_key(1)
        cands = [item_key(i) for i in (4, 9, 15, 22)]
        code, out = http_call(url + "/v1/recommend", {"user_id": user, "candidates": cands})
        assert code == 200 and sorted(x["item_id"] for x in out["ranking"]) == sorted(cands), out
        code, out = http_call(url + "/v1/recommend", {"user_id": user, "num_candidates": 5})
        assert code == 200 and out["retrieved"] and len(out["ranking"]) == 5, out
        seen = {ds.items[i].id for i in ds.sequences[1]}
        assert all(isinstance(x["item_id"], str) and x["item_id"] not in seen for x in out["ranking"])
        from urllib.parse import quote
        code, out = http_call(url + f"/v1/users/{quote('new-ü')}/events", {"items": [item_key(3), item_key(8)]})
        assert code == 200 and out["history_length"] == 2, out
        code, out = http_call(url + f"/v1/users/{quote('new-ü')}")
        assert code == 200 and out["history"] == [item_key(3), item_key(8)], out
        code, out = http_call(url + "/v1/recommend", {"user_id": user, "candidates": [item_key(4), "sku-nope"]})
        assert code == 404 and "sku-nope" in out["error"], out
        code, out = http_call(url + "/v1/items/" + quote(item_key(5)))
        assert code == 200 and out["item_id"] == item_key(5) and out["text"].startswith("Widget 5 ✓ by"), out
    finally:
        assert srv.stop()[0] == 0
    r = run("recommend.py", *common, "--history_len=4", f"--user_id={user}", "--num_candidates=6", "--top_k=3")
    assert "user user-ü-0:" in r.stdout and r.stdout.count(" by ") >= 3, r.stdout
    assert "(saved with the snapshot;" in r.stdout  # the server's calibration, reused
    out = tmp_path / "bench.json"
    run("bench.py", *common[:-1], "--history_len=4", "--modes=full,rcllm", "--num_users=3", "--num_candidates=5",
        "--nowarmup", "--peers=", f"--output_json={out}")
    data = json.loads(out.read_text())
    rows = {x["mode"]: x for x in data["results"]}
    assert {"full", "rcllm"} <= set(rows) and data["config"]["num_requests"] == 3
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "recommend.py"), *common, "--user_id=nobody"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "unknown user 'nobody'" in r.stderr


@pytest.mark.slow
def test_a_head_for_your_own_model_and_catalog_in_one_command(shop, smollm2, tmp_path):
    """docs/your_own_model.md: launch/train.py --catalog --model fits a score-slot head for that
    model on that catalog (its card names the catalog and the prompt); bench.py serves it on the
    catalog's test positions, and the shipped head is refused there (other weights)."""
    from test_serve import tiny_model

    from rcllm_jax.data.prompt_template import DEFAULT_TEMPLATE
    from rcllm_jax.engine.ranking_head import SlotHead
    d, _, _ = shop
    tiny = tiny_model(tmp_path / "model", smollm2.tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    out = tmp_path / "ranker"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), f"--catalog={d}", f"--model={tiny}",
                        f"--output_dir={out}", "--positions=4", "--validation_position=3", "--collaborative_positions=4",
                        "--num_candidates=10", "--history_len=4", "--head_steps=20", "--l2=1e-2", "--steps=0"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    head = SlotHead.load(out / "head")
    assert head.card["prompt_digest"] == DEFAULT_TEMPLATE.digest() and "the catalog shop (2000 items" in head.card["data"]
    assert head.card["train_examples"] > 0
    js = tmp_path / "b.json"
    bench = [sys.executable, str(ROOT / "launch" / "bench.py"), f"--catalog={d}", f"--model={tiny}", "--head=slot",
             "--candidates=retrieved", "--candidate_order=retriever", "--num_candidates=10", "--history_len=4",
             "--modes=full,rcllm", "--num_users=20", "--test_positions=1-2", "--nowarmup", "--peers=",
             f"--output_json={js}"]
    b = subprocess.run([*bench, f"--ranking_head={out / 'head'}"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert b.returncode == 0, b.stderr[-3000:]
    rows = {x["mode"]: x for x in json.loads(js.read_text())["results"]}
    assert {"full", "rcllm", "retriever", "collaborative"} <= set(rows)
    b = subprocess.run(bench, env=env, capture_output=True, text=True, timeout=900)
    assert b.returncode != 0 and "trained on other weights" in b.stderr
