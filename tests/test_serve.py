"""The real server (launch/serve.py) in a subprocess on an ephemeral port, spoken to over HTTP:
rankings equal an in-process engine's, every bad input gets its 4xx and the server keeps serving,
concurrent clients, the load-test script, SIGTERM drain + user-store save, restart + restore."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 120


def _call(url, body=None, raw=None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "launch/serve.py"), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise AssertionError("server did not start:\n" + "".join(self.lines[-40:]))
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=300)
        self.reader.join(10)
        return code, "".join(self.lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    from rcllm_jax.model import ModelConfig, init_params
    from rcllm_jax.model.export import save_hf_dir
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=512)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_dir(path, init_params(cfg, jax.random.key(7), scale=0.1), cfg, smollm2.tokenizer)
    return path


def _reference(tiny, history, cands, user):
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import load_model
    m = load_model(tiny)
    ds = load_dataset("ml-100k")
    b = PromptBuilder(m.tokenizer, ds.items, history_len=5, max_prompt_tokens=m.cfg.max_position)
    e = Engine(m.params, m.cfg, b, item_ids=sorted(ds.items)[:N_ITEMS], max_candidates=52, user_pages=64,
               prefix_pages=1)
    e.build_store()
    return e.rank(b.build(history, cands), "rcllm", user_id=user).scores, ds


@pytest.mark.slow
def test_server_end_to_end(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    args = ["--mesh=items:2", f"--model={tiny}", "--head=label", f"--max_items={N_ITEMS}", "--port=0", "--history_len=5",
            f"--snapshot_dir={tmp_path / 'snap'}", "--user_cache_pages=128"]
    srv = Server(args, env)
    try:
        url = srv.url
        cands = [50, 1, 100, 7, 12, 98, 117, 64]
        code, out = _call(url + "/v1/recommend", {"user_id": 1, "candidates": cands, "top_k": 5})
        assert code == 200, out
        from rcllm_jax.data.movielens import load_dataset
        ds = load_dataset("ml-100k")
        ref, _ = _reference(tiny, ds.sequences[1], cands, 1)
        want = np.argsort(-ref, kind="stable")[:5]
        assert [r["item_id"] for r in out["ranking"]] == [cands[i] for i in want]
        assert rel_err([r["score"] for r in out["ranking"]], ref[want]) <= 1e-5
        assert out["shard"] in (0, 1) and set(out["timings"]) == {"queue_s", "ttft_s", "prefill_s", "total_s"}
        assert out["timings"]["prefill_s"] <= out["timings"]["ttft_s"] <= out["timings"]["total_s"]
        assert out["cache"]["local_item_blocks"] + out["cache"]["remote_item_blocks"] == len(cands)
        # no candidates: retrieved from the served histories (an item-kNN saved with the snapshot), reranked
        served = set(range(1, N_ITEMS + 1))
        user = next(u for u in sorted(ds.sequences) if len(served - set(ds.sequences[u])) >= 6)
        code, out = _call(url + "/v1/recommend", {"user_id": user, "num_candidates": 6})
        assert code == 200 and out["retrieved"] is True and len(out["ranking"]) == 6, out
        from rcllm_jax.retrieval import ItemKNN
        r = ItemKNN.load(tmp_path / "snap" / "retriever.npz")
        assert {x["item_id"] for x in out["ranking"]} == set(r.retrieve(ds.sequences[user], 6)[0])
        assert not {x["item_id"] for x in out["ranking"]} & set(ds.sequences[user])
        # a user who has seen every served item: a clear 400, not a 500
        full = next((u for u in sorted(ds.sequences) if served <= set(ds.sequences[u])), None)
        if full is not None:
            code, out = _call(url + "/v1/recommend", {"user_id": full})
            assert code == 400 and "cannot retrieve" in out["error"], out
        code, out = _call(url + "/v1/recommend", {"user_id": 987654, "num_candidates": 3})  # unknown, no history
        assert code == 200 and len(out["ranking"]) == 3, out

        bad = [({"raw": b"{not json"}, 400, "malformed JSON"),
               ({"body": {"user_id": 1, "candidates": [1, 99999]}}, 404, "unknown item"),
               ({"body": {"user_id": 1, "candidates": [200]}}, 404, "unknown item"),  # beyond --max_items
               ({"body": {"user_id": 1, "candidates": []}}, 400, "empty"),
               ({"body": {"user_id": 1, "candidates": [3, 3]}}, 400, "duplicate"),
               ({"body": {"user_id": 1, "candidates": list(range(1, 54))}}, 400, "at most 52"),
               ({"body": {"user_id": 1, "candidates": list(range(1, 41))}}, 413, "exceeds"),
               ({"raw": json.dumps({"user_id": 1, "candidates": [1], "pad": "x" * 70000}).encode()}, 413, "exceeds the limit"),
               ({"body": {"user_id": 1.5, "candidates": [1]}}, 400, "integer")]
        for kw, status, msg in bad:
            code, body = _call(url + "/v1/recommend", kw.get("body"), kw.get("raw"))
            assert code == status and msg in body["error"], (kw, code, body)
        assert _call(url + "/v1/nothing", {"a": 1})[0] == 404
        assert _call(url + "/healthz")[1]["status"] == "ok"
        code, item = _call(url + "/v1/items/50")
        assert code == 200 and item["title"] == "Star Wars" and item["cached"] and item["shard"] in (0, 1)
        assert _call(url + "/v1/items/5000")[0] == 404

        # concurrent clients: every request answered once
        got, lock = [], threading.Lock()

        def client(u):
            for j in range(3):
                r = _call(url + "/v1/recommend", {"user_id": u, "candidates": [u, u + 10, u + 20, 60 + j]})
                with lock:
                    got.append(r)
        threads = [threading.Thread(target=client, args=(u,)) for u in range(2, 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 18 and all(c == 200 for c, _ in got)
        assert len({b["request_id"] for _, b in got}) == 18

        r = subprocess.run([sys.executable, str(ROOT / "launch/loadtest.py"), f"--url={url}", "--clients=3",
                            "--requests=9", f"--max_item={N_ITEMS}", "--num_candidates=6",
                            f"--output_json={tmp_path / 'load.json'}"], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        load = json.loads((tmp_path / "load.json").read_text())
        assert load["sent"] == 9 and load["answered_200"] == 9 and load["lost"] == 0 and load["ttft_p50_s"] > 0

        code, ev = _call(url + "/v1/users/5/events", {"items": [10, 20]})
        assert code == 200 and ev["history_length"] == len(ds.sequences[5]) + 2
        assert _call(url + "/v1/users/5/events", {"items": [99999]})[0] == 404
        metrics = _call(url + "/metrics")[1]
        assert "rcllm_ttft_seconds_count" in metrics and "rcllm_queue_depth 0" in metrics
        assert re.search(r"rcllm_requests_total (\d+)", metrics).group(1) == str(1 + 2 + 18 + 9)  # + the two retrieved requests
    finally:
        code, log = srv.stop()
    assert code == 0 and "saved" in log and "user prefixes" in log, log[-3000:]

    # restart: items from the snapshot, users (KV and histories) from the user snapshot
    srv = Server(args, env)
    try:
        assert "restored item caches" in "".join(srv.lines)
        cands = [10, 33, 64, 2]
        code, out = _call(srv.url + "/v1/recommend", {"user_id": 5, "candidates": cands})
        assert code == 200
        ref, _ = _reference(tiny, list(ds.sequences[5]) + [10, 20], cands, 5)
        assert rel_err([r["score"] for r in out["ranking"]], np.sort(ref)[::-1]) <= 1e-5
        assert out["cache"]["computed_tokens"] == 1  # the history prefix came back from the snapshot
    finally:
        code, log = srv.stop()
    assert code == 0


@pytest.mark.slow
def test_default_head_refuses_other_weights(tiny, tmp_path):
    """serve.py scores with the shipped slot head by default; on another model it stops at once
    with a message that says what to do, before building anything."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/serve.py"), f"--model={tiny}", "--port=0",
                        f"--snapshot_dir={tmp_path / 'snap'}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trained for other weights than --model" in r.stderr and "--head=label" in r.stderr
    assert not (tmp_path / "snap").exists()
