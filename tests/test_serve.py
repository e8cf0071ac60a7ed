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
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 120


def http_call(url, body=None, raw=None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _compiles(url) -> int:
    """XLA compilations the server counted so far (its /metrics)."""
    metrics = http_call(url + "/metrics")[1]
    return int(float(re.search(r"\nrcllm_compiles_total (\S+)\n", metrics).group(1)))


def _raw_http(url, text: str, timeout: float = 30) -> str:
    """Send raw bytes to the server; its answer's text (what a misbehaving client sees)."""
    import socket
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(text.encode())
        return s.recv(65536).decode(errors="replace")


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


def tiny_model(path, tokenizer, max_position: int = 512):
    """A 2-layer random model with the real tokenizer, saved as an HF directory."""
    from rcllm_jax.model import ModelConfig, init_params
    from rcllm_jax.model.export import save_hf_dir
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=max_position)
    save_hf_dir(path, init_params(cfg, jax.random.key(7), scale=0.1), cfg, tokenizer)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2.tokenizer)


def _reference(tiny, history, cands, user, prompt=None, policy="rcllm"):
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.data.prompt_template import load_template
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import load_model
    m = load_model(tiny)
    ds = load_dataset("ml-100k")
    b = PromptBuilder(m.tokenizer, ds.items, history_len=5, max_prompt_tokens=m.cfg.max_position,
                      template=load_template(prompt))
    e = Engine(m.params, m.cfg, b, item_ids=sorted(ds.items)[:N_ITEMS], max_candidates=52, user_pages=64,
               prefix_pages=1, kv_dtype="bfloat16")  # the server's default cache dtype
    e.build_store()
    return e.rank(b.build(history, cands), policy, user_id=user).scores, ds


@pytest.mark.slow
def test_server_end_to_end(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    preset = tmp_path / "serve.toml"  # the settings through a preset; the command line wins over it (history 5)
    snap = tmp_path / "snap"
    preset.write_text(f'[mesh]\nmesh = "items:2"\n[catalog]\nmax_items = {N_ITEMS}\nhistory_len = 9\n'
                      f'[engine]\nuser_cache_pages = 128\nsnapshot_dir = "{snap}"\n'
                      '[model]\nhead = "label"\n[serving]\nport = 0\n')
    args = [f"--config={preset}", f"--model={tiny}", "--history_len=5"]
    srv = Server(args, env)
    try:
        url = srv.url
        assert "every accepted request shape" in "".join(srv.lines)
        compiled = _compiles(url)  # after the warm-up: no request below may compile (any accepted shape)
        assert compiled > 0  # the counter includes the warm-up's compiles
        # rcllm's policy was calibrated at start for this model and prompt (no calibration in the snapshot)
        from rcllm_jax.engine.selective_recompute import Policy
        health = http_call(url + "/healthz")[1]
        calibration, policy = health["calibration"], Policy(**health["policy"])
        assert "(calibrated now on 16 requests;" in "".join(srv.lines) and calibration["requests"] == 16
        assert calibration["target_met"] == (calibration["policy"] != "exact")
        assert calibration["measured"]["top1_agreement"] >= 0.95 or not calibration["target_met"]
        assert list(snap.glob("calibration/*.json"))
        cands = [50, 1, 100, 7, 12, 98, 117, 64]
        code, out = http_call(url + "/v1/recommend", {"user_id": 1, "candidates": cands, "top_k": 5})
        assert code == 200, out
        from rcllm_jax.data.movielens import load_dataset
        ds = load_dataset("ml-100k")
        ref, _ = _reference(tiny, ds.sequences[1], cands, 1, policy=policy)  # the policy the server runs
        want = np.argsort(-ref, kind="stable")[:5]
        assert [r["item_id"] for r in out["ranking"]] == [cands[i] for i in want]
        assert rel_err([r["score"] for r in out["ranking"]], ref[want]) <= 1e-5
        assert out["shard"] in (0, 1) and set(out["timings"]) == {"queue_s", "ttft_s", "prefill_s", "total_s"}
        assert out["timings"]["prefill_s"] <= out["timings"]["ttft_s"] <= out["timings"]["total_s"]
        assert out["cache"]["local_item_blocks"] + out["cache"]["remote_item_blocks"] == len(cands)
        # no candidates: retrieved from the served histories (an item-kNN saved with the snapshot), reranked
        served = set(range(1, N_ITEMS + 1))
        user = next(u for u in sorted(ds.sequences) if len(served - set(ds.sequences[u])) >= 6)
        code, out = http_call(url + "/v1/recommend", {"user_id": user, "num_candidates": 6})
        assert code == 200 and out["retrieved"] is True and len(out["ranking"]) == 6, out
        from rcllm_jax.retrieval import ItemKNN
        r = ItemKNN.load(tmp_path / "snap" / "retriever.npz")
        assert {x["item_id"] for x in out["ranking"]} == set(r.retrieve(ds.sequences[user], 6)[0])
        assert not {x["item_id"] for x in out["ranking"]} & set(ds.sequences[user])
        # a user who has seen every served item: a clear 400, not a 500
        full = next((u for u in sorted(ds.sequences) if served <= set(ds.sequences[u])), None)
        if full is not None:
            code, out = http_call(url + "/v1/recommend", {"user_id": full})
            assert code == 400 and "cannot retrieve" in out["error"], out
        code, out = http_call(url + "/v1/recommend", {"user_id": 987654, "num_candidates": 3})  # unknown, no history
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
        bad += [({"raw": b"{\"user_id\": " + b"7" * 5000 + b", \"candidates\": [1]}"}, 400, "more digits"),
                ({"raw": b"[" * 30000 + b"]" * 30000}, 400, ""),  # nested deeper than the parser goes
                ({"body": {"user_id": "u 1", "candidates": [1]}}, 400, "user_id"),
                ({"body": {"user_id": 1, "candidates": [2**70]}}, 400, "")]
        for kw, status, msg in bad:
            code, body = http_call(url + "/v1/recommend", kw.get("body"), kw.get("raw"))
            assert code == status and msg in body["error"], (kw, code, body)
        for length in ("-1", "abc"):  # a Content-Length that is not a length: 400 at once, nothing read
            assert _raw_http(url, f"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
                             ).startswith("HTTP/1.1 400")
        # opaque string ids: "1" is MovieLens user 1; any other string is a new user
        code, out = http_call(url + "/v1/recommend", {"user_id": "1", "candidates": cands, "top_k": 5})
        assert code == 200 and out["user_id"] == "1" and [r["item_id"] for r in out["ranking"]] == [cands[i] for i in want]
        code, out = http_call(url + "/v1/recommend", {"user_id": "u-abc", "history": [1, 50], "candidates": [7, 100]})
        assert code == 200 and out["user_id"] == "u-abc", out
        # many users at once: one answer per request, in order, a bad one answered on its own
        code, out = http_call(url + "/v1/recommend/batch", {"requests": [
            {"user_id": 1, "candidates": cands, "top_k": 5}, {"user_id": 2, "candidates": [99999]},
            {"user_id": "u-abc", "num_candidates": 3}]})
        assert code == 200 and len(out["results"]) == 3, out
        assert [r["item_id"] for r in out["results"][0]["ranking"]] == [cands[i] for i in want]
        assert out["results"][1]["status"] == 404 and len(out["results"][2]["ranking"]) == 3
        code, schema = http_call(url + "/openapi.json")
        assert code == 200 and {"/v1/recommend", "/v1/recommend/batch", "/v1/users/{user_id}/events"} <= set(schema["paths"])
        assert http_call(url + "/v1/nothing", {"a": 1})[0] == 404
        health = http_call(url + "/healthz")[1]
        assert health["status"] == "ok" and health["mode"] == "rcllm" and health["policy"]["sink"] >= 0
        assert health["canonical"] == "candidate"
        code, item = http_call(url + "/v1/items/50")
        assert code == 200 and item["title"] == "Star Wars" and item["cached"] and item["shard"] in (0, 1)
        assert http_call(url + "/v1/items/5000")[0] == 404

        # concurrent clients: every request answered once
        got, lock = [], threading.Lock()

        def client(u):
            for j in range(3):
                r = http_call(url + "/v1/recommend", {"user_id": u, "candidates": [u, u + 10, u + 20, 60 + j]})
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

        code, ev = http_call(url + "/v1/users/5/events", {"items": [10, 20]})
        assert code == 200 and ev["history_length"] == len(ds.sequences[5]) + 2
        assert http_call(url + "/v1/users/5/events", {"items": [99999]})[0] == 404
        metrics = http_call(url + "/metrics")[1]
        assert "rcllm_ttft_seconds_count" in metrics and "\nrcllm_queue_depth 0.0\n" in metrics
        # + the two retrieved requests, two string-id requests and the two of the batch that were valid
        assert re.search(r"\nrcllm_requests_total (\d+)\.0\n", metrics).group(1) == str(1 + 2 + 2 + 2 + 18 + 9)
        assert "# TYPE rcllm_compiles_total counter" in metrics and "# HELP rcllm_requests_total" in metrics
        assert re.search(r'\nrcllm_http_responses_total\{status="404"\} [1-9]', metrics)
        assert "# TYPE rcllm_user_cache_misses_total counter" in metrics
        assert _compiles(url) == compiled, "a request compiled after the warm-up"
        # clients that never finish their request must not hold the shutdown (nor the user-store save)
        import socket
        host, port = url.split("//")[1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        idle[0].sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        idle[1].sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\n")  # headers never end
        t_stop = time.perf_counter()
    finally:
        code, log = srv.stop()
    assert time.perf_counter() - t_stop < 60, "shutdown waited on idle clients"
    assert code == 0 and "saved" in log and "user prefixes" in log, log[-3000:]

    # restart: items from the snapshot, users (KV and histories) from the user snapshot
    srv = Server(args + ["--nowarmup"], env)
    try:
        assert "restored item caches" in "".join(srv.lines)
        assert "(saved with the snapshot;" in "".join(srv.lines)  # the calibration, not made again
        cands = [10, 33, 64, 2]
        code, out = http_call(srv.url + "/v1/recommend", {"user_id": 5, "candidates": cands})
        assert code == 200
        ref, _ = _reference(tiny, list(ds.sequences[5]) + [10, 20], cands, 5, policy=policy)
        assert rel_err([r["score"] for r in out["ranking"]], np.sort(ref)[::-1]) <= 1e-5
        # the history prefix came back from the snapshot: the first request computes no more than a
        # repeat of it (only the fresh glue and the last token)
        again = http_call(srv.url + "/v1/recommend", {"user_id": 5, "candidates": cands})[1]
        assert out["cache"]["computed_tokens"] == again["cache"]["computed_tokens"] < out["cache"]["prompt_tokens"] // 2
    finally:
        code, log = srv.stop()
    assert code == 0


@pytest.mark.slow
def test_default_head_refuses_other_weights(tiny, tmp_path):
    """serve.py and bench.py score with the shipped slot head by default; on another model each
    stops at once with a message that says what to do, before building anything."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/serve.py"), f"--model={tiny}", "--port=0",
                        f"--snapshot_dir={tmp_path / 'snap'}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trained on other weights" in r.stderr and "--head=label" in r.stderr
    assert not (tmp_path / "snap").exists()
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench.py"), f"--model={tiny}", "--modes=rcllm",
                        "--num_users=1", "--num_candidates=3", "--nowarmup", "--peers=",
                        f"--output_json={tmp_path / 'b.json'}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trained on other weights" in r.stderr and "--head=label" in r.stderr
    assert not re.search(r"\] item store: \d+ blocks", r.stderr) and not (tmp_path / "b.json").exists()
    # the shipped head was trained on the default prompt: another template is refused the same way
    r = subprocess.run([sys.executable, str(ROOT / "launch/serve.py"), "--port=0",
                        f"--snapshot_dir={tmp_path / 'snap'}",
                        f"--prompt={ROOT / 'configs' / 'prompts' / 'candidate_pool.toml'}"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trained on another prompt template" in r.stderr and "--head=label" in r.stderr
    assert not (tmp_path / "snap").exists()


@pytest.mark.slow
def test_recommend_cli(tiny, tmp_path):
    """launch/recommend.py (the README's main job): the retriever's candidates, reranked, printed
    best first with titles; the ranking and scores equal an in-process engine's on the same prompt
    (another prompt template than the default: --prompt reaches the engine)."""
    prompt = ROOT / "configs" / "prompts" / "candidate_pool.toml"
    from rcllm_jax.data.movielens import load_dataset
    from rcllm_jax.retrieval import ItemKNN
    ds = load_dataset("ml-100k")
    user = next(u for u in sorted(ds.sequences) if len(set(range(1, N_ITEMS + 1)) - set(ds.sequences[u])) >= 6)
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/recommend.py"), f"--user_id={user}", f"--model={tiny}",
                        "--head=label", f"--max_items={N_ITEMS}", "--history_len=5", "--num_candidates=6",
                        "--top_k=3", f"--snapshot_dir={tmp_path / 'snap'}", f"--prompt={prompt}",
                        "--calibration_requests=0"], env=env,
                       capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [m.groups() for m in re.finditer(r"^\s+(\d) +(\d+) +(-?[\d.]+)  (.+)$", r.stdout, re.M)]
    assert [int(x[0]) for x in rows] == [1, 2, 3], r.stdout
    cands = list(ItemKNN.load(tmp_path / "snap" / "retriever.npz").retrieve(ds.sequences[user], 6)[0])
    ref, _ = _reference(tiny, ds.sequences[user], cands, user, prompt)
    want = np.argsort(-ref, kind="stable")[:3]
    assert [int(x[1]) for x in rows] == [cands[i] for i in want]
    np.testing.assert_allclose([float(x[2]) for x in rows], ref[want], atol=2e-3)
    assert all(ds.items[int(x[1])].title in x[3] for x in rows)
    assert re.search(r"TTFT rcllm [\d.]+ ms .* vs full [\d.]+ ms: [\d.]+x lower; top-3 overlap \d/3", r.stdout)


@pytest.mark.slow
def test_readme_curl_examples(smollm2, tmp_path):
    """Every curl line of the README's serving section, run as written (only the port differs)
    against a live server over the whole catalog: each answers 200 with what the README says."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):text.index("## Item caches on a mesh")]
    block = re.search(r"```bash\n(curl .*?)```", section, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("curl ")]
    assert len(lines) >= 8, lines
    tiny = tiny_model(tmp_path / "model", smollm2.tokenizer, 2048)  # room for 20 candidates with label prompts
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    srv = Server(["--mesh=items:2", f"--model={tiny}", "--head=label", "--port=0", "--history_len=5",
                  f"--snapshot_dir={tmp_path / 'snap'}", "--user_cache_pages=128", "--nowarmup",
                  "--calibration_requests=0"], env)
    try:
        port = srv.url.rsplit(":", 1)[1]
        for line in lines:
            cmd = line.replace("localhost:8000", f"localhost:{port}") + " -w '\\n%{http_code}'"
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
            body, code = r.stdout.rsplit("\n", 1)
            assert r.returncode == 0 and code == "200", (line, code, body[:500])
            if "/metrics" in line:
                assert "rcllm_requests_total" in body
                continue
            out = json.loads(body)
            if "/v1/recommend/batch" in line:
                assert [len(x["ranking"]) for x in out["results"]] == [20, 3], out
            elif "/v1/recommend" in line:
                assert out["ranking"] and all("title" in x for x in out["ranking"]), out
    finally:
        srv.stop()


@pytest.mark.slow
def test_server_state_is_exact_and_survives_kill_9(tiny, tmp_path):
    """Issue 34 through HTTP against a live serve.py (items:2, batched serving steps): one user
    twice in one step with different histories, each answered as if sent alone; an event retried
    with its event_id applies once; a 404 / 413 request carrying a history leaves the stored one
    as it was; "007" and "7" stay two users; kill -9 right after an acknowledged event, restart:
    the event is there; the per-client connection cap answers JSON 503 + Retry-After; /metrics
    counts the middleware's own 411 / 413; SIGTERM while the engine is busy saves a consistent
    user store that the next start restores."""
    import socket
    from rcllm_jax.data.movielens import load_dataset
    ds = load_dataset("ml-100k")
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    args = ["--mesh=items:2", f"--model={tiny}", "--head=label", f"--max_items={N_ITEMS}", "--port=0",
            "--calibration_requests=0",
            "--history_len=5", f"--snapshot_dir={tmp_path / 'snap'}", "--user_cache_pages=128", "--nowarmup",
            "--serving_step=batched", "--window=8", "--max_client_connections=4"]
    srv = Server(args, env)
    try:
        url = srv.url
        cands = [50, 1, 100, 7]
        batch = [{"user_id": "u1", "history": [1, 2, 3], "candidates": cands},
                 {"user_id": "u1", "history": [1, 2, 3, 9, 10], "candidates": cands},
                 {"user_id": "u2", "history": [11, 12], "candidates": [13, 5]}]
        code, out = http_call(url + "/v1/recommend/batch", {"requests": batch})
        assert code == 200 and all("ranking" in r for r in out["results"]), out
        for body, got in zip(batch, out["results"]):
            code, alone = http_call(url + "/v1/recommend", body)
            assert code == 200 and [x["item_id"] for x in got["ranking"]] == [x["item_id"] for x in alone["ranking"]]
            assert rel_err([x["score"] for x in got["ranking"]], [x["score"] for x in alone["ranking"]]) <= 1e-5
        assert http_call(url + "/v1/users/u1")[0] == 404  # a recommend request stores nothing

        seven = http_call(url + "/v1/users/7")[1]
        assert seven["history"] == list(ds.sequences[7]) and seven["version"] == 0
        code, a = http_call(url + "/v1/users/007/events", {"items": [11, 12], "event_id": "e-1"})
        code2, b = http_call(url + "/v1/users/007/events", {"items": [11, 12], "event_id": "e-1"})
        assert code == code2 == 200 and (a["replay"], b["replay"]) == (False, True)
        assert a["history_length"] == b["history_length"] == 2 and a["version"] == b["version"] == 1
        assert http_call(url + "/v1/users/007/events", {"items": [13], "event_id": "e-1"})[0] == 409
        for body, status in (({"user_id": "7", "history": [1, 2], "candidates": [99999]}, 404),
                             ({"user_id": "7", "history": [1, 2], "candidates": list(range(1, 41))}, 413)):
            assert http_call(url + "/v1/recommend", body)[0] == status
        assert http_call(url + "/v1/users/7")[1] == seven
        code, ev = http_call(url + "/v1/users/7/events", {"items": [20]})
        assert code == 200 and ev["version"] == 1

        # connections beyond the per-client cap: a JSON 503 with Retry-After, the server unharmed
        host, port = url.split("//")[1].split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(4)]
        time.sleep(0.5)
        extra = _raw_http(url, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.startswith("HTTP/1.1 503") and "retry-after: 1" in extra.lower() and '"status": 503' in extra
        for s in held:
            s.close()
        time.sleep(0.5)
        assert _raw_http(url, "POST /v1/recommend HTTP/1.1\r\nHost: x\r\n\r\n").startswith("HTTP/1.1 411")
        metrics = http_call(url + "/metrics")[1]
        assert re.search(r'\nrcllm_http_responses_total\{status="411"\} 1\.0', metrics)
        assert re.search(r'\nrcllm_http_responses_total\{status="503"\} 1\.0', metrics)
        # item ids are opaque strings: none of these is item 50 (Python's int() would take each)
        assert http_call(url + "/v1/items/50")[0] == 200
        assert http_call(url + "/v1/items/+50")[0] == http_call(url + "/v1/items/5_0")[0] == 404
        assert http_call(url + "/v1/items/%D9%A5%D9%A0")[0] == 404  # Arabic-Indic digits
    finally:
        srv.proc.kill()  # kill -9 right after the acknowledged events
        srv.proc.wait(60)

    srv = Server(args, env)
    try:
        url = srv.url
        got = http_call(url + "/v1/users/007")[1]
        assert got == {"user_id": "007", "history": [11, 12], "version": 1}
        assert http_call(url + "/v1/users/7")[1]["history"] == list(ds.sequences[7]) + [20]
        assert http_call(url + "/v1/users/007/events", {"items": [11, 12], "event_id": "e-1"})[1]["replay"] is True
        # SIGTERM while the engine is busy: every queued request answered, the store saved whole
        answers = []

        def ask(u):
            try:
                answers.append(http_call(url + "/v1/recommend", {"user_id": u, "candidates": [u + 1, u + 2, u + 3]})[0])
            except OSError:  # sent after the server stopped accepting: refused, never half-answered
                answers.append(-1)
        threads = [threading.Thread(target=ask, args=(u,)) for u in range(20, 28)]
        for t in threads:
            t.start()
        time.sleep(0.3)
    finally:
        code, log = srv.stop()
    for t in threads:
        t.join()
    assert code == 0 and re.search(r"saved \d+ user prefixes", log), log[-3000:]
    assert answers and all(c in (200, 503, -1) for c in answers) and 200 in answers, answers
    srv = Server(args, env)
    try:
        assert re.search(r"[1-9]\d* cached user prefixes restored", "".join(srv.lines)), "".join(srv.lines)[-3000:]
        assert http_call(srv.url + "/v1/users/007")[1]["history"] == [11, 12]
    finally:
        srv.stop()

