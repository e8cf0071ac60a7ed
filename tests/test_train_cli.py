"""launch/train_label.py end to end on the real default model (two steps, tiny prompts), then the
tuned model served by bench.py through --adapter and through the merged directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, **kw)


@pytest.mark.slow
def test_train_then_bench_with_adapter(tmp_path):
    out = tmp_path / "run"
    args = ["launch/train_label.py", f"--output_dir={out}", "--steps=2", "--batch_size=2", "--micro_batch=1",
            "--train_layers=1", "--lora_rank=4", "--history_len=2", "--num_candidates=4", "--max_len=192",
            "--checkpoint_every=1", "--val_every=2", "--val_users=2", "--test_users=2",
            "--block_attention_prob=0.5"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2]
    assert {"full_hr@10", "stitch_hr@10"} <= set(log["test"]) and "val_stitch_hr@10" in log["history"][-1]
    assert sorted(p.name for p in (out / "checkpoints" / "ckpt").iterdir()) == ["1", "2"]
    # rerun: resumes at the end, trains nothing more
    r2 = _run(args)
    assert r2.returncode == 0 and "0 this run" in r2.stdout, r2.stderr[-2000:]
    # served: the adapter on the base model, and the merged directory, give the same fingerprint
    fps = []
    for model_args in (["--adapter", str(out / "adapter")], ["--model", str(out / "merged")]):
        js = tmp_path / f"b{len(fps)}.json"
        b = _run(["launch/bench.py", "--modes=full,rcllm", "--head=label", "--num_users=2", "--num_candidates=4",
                  "--calibration_requests=0",
                  "--nowarmup",
                  "--history_len=2", "--peers=", f"--output_json={js}", *model_args])
        assert b.returncode == 0, b.stderr[-3000:]
        fps.append(json.loads(js.read_text())["config"]["model_fingerprint"])
    assert fps[0] == fps[1]
    # a wrong adapter directory is a clear error
    b = _run(["launch/bench.py", "--num_users=1", "--adapter", str(out / "merged")])
    assert b.returncode != 0 and "adapter_config.json" in b.stderr


@pytest.mark.slow
def test_train_ranker_then_resume_and_serve(tmp_path):
    """launch/train.py on the real default model (a few users, 2 stage-2 steps): stage 0 fits the
    collaborative scorer, both later stages write a head over it, the ranker carries its query
    adapter, a rerun resumes at the end, and bench.py serves the ranker through --ranking_head
    (with the collaborative scorer alone as a baseline row)."""
    out = tmp_path / "ranker"
    args = ["launch/train.py", f"--output_dir={out}", "--max_users=20", "--steps=2", "--batch_size=2",
            "--val_every=2", "--checkpoint_every=1", "--val_examples=3", "--head_steps=10", "--l2=1e-2",
            "--lora_rank=2", "--lora_targets=wq,wv"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    curve = log["stage2"]["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and "val_ndcg@10" in curve[-1]
    assert log["card"]["train_examples"] > 0 and log["stage1"][0]["l2"] == 0.01
    from rcllm_jax.engine.ranking_head import SlotHead
    ranker, head = SlotHead.load(out / "ranker"), SlotHead.load(out / "head")
    assert ranker.adapter_cfg.targets == ("wq", "wv") and head.adapter is None
    assert ranker.base_fingerprint == head.base_fingerprint == log["card"]["base_fingerprint"]
    from rcllm_jax.retrieval import CANDIDATE_FEATURES
    assert log["stage0"]["examples"] > log["card"]["train_examples"]  # positions 5-22 vs 6, 5
    assert log["card"]["validation_position"] == 4 and min(log["card"]["positions"]) == 5
    assert ranker.side_features == head.side_features == CANDIDATE_FEATURES
    assert np.array_equal(ranker.side_weights, head.side_weights)
    assert np.allclose(head.side_weights, log["stage0"]["side_weights"])
    r2 = _run(args)  # resumes at step 2: nothing more trained, the same ranker
    assert r2.returncode == 0, r2.stderr[-2000:]
    log2 = json.loads((out / "train_log.json").read_text())
    assert log2["stage2"]["resumed_from"] == 2 and log2["stage2"]["curve"] == curve
    again = SlotHead.load(out / "ranker")
    assert all((again.adapter[n]["b"] == ranker.adapter[n]["b"]).all() for n in ranker.adapter)
    js = tmp_path / "b.json"
    bench = ["launch/bench.py", "--head=slot", f"--ranking_head={out / 'ranker'}", "--candidates=retrieved",
             "--calibration_requests=0",
             "--candidate_order=retriever", "--modes=full,rcllm", "--num_users=2", "--history_len=3", "--peers=",
             "--nowarmup", f"--output_json={js}"]
    b = _run(bench + ["--test_positions=1-3"])  # the test positions below the head's validation one
    assert b.returncode == 0, b.stderr[-3000:]
    data = json.loads(js.read_text())
    rows = {x["mode"]: x for x in data["results"]}
    assert {"full", "rcllm", "retriever", "collaborative"} <= set(rows)
    assert data["config"]["test_positions"] == [1, 2, 3] and data["config"]["num_requests"] == 6
    assert data["config"]["intervals"] == "bootstrap over users"
    assert set(data["config"]["retriever"]["recall@20_by_position"]) == {"1", "2", "3"}
    b = _run(bench + ["--test_positions=1-4"])  # position 4 validated the head: refused
    assert b.returncode != 0 and "validated at held-back position 4" in b.stderr


def test_train_on_the_warm_world_with_dropped_features(tmp_path):
    """--cold_split trains without the cold slices' items and users; --cold_dropout fits on dropped
    collaborative features and judges every L2 on clean and dropped validation (its mean picks);
    --side_features adds the content features, which the saved head names and weighs."""
    out = tmp_path / "cold"
    names = ("knn_relative", "knn_log", "follow_relative", "content_relative", "cold")
    r = _run(["launch/train.py", f"--output_dir={out}", "--max_users=20", "--steps=0", "--val_examples=4",
              "--head_steps=10", "--l2=1e-2,10", "--cold_split", "--cold_dropout=0.5",
              f"--side_features={','.join(names)}"])
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    card = log["card"]
    assert card["cold_split"]["new_items"] > 0 and card["cold_dropout"] == 0.5
    from rcllm_jax.engine.ranking_head import SlotHead
    head = SlotHead.load(out / "head")
    assert head.side_features == names and head.side_weights.shape == (5,)
    assert card["collaborative"]["features"] == list(names)
    bad = _run(["launch/train.py", f"--output_dir={tmp_path / 'bad'}", "--max_users=20",
                "--side_features=knn_log,genre"])
    assert bad.returncode != 0 and "--side_features: candidate features must be distinct names" in bad.stderr
    runs = log["stage1"]
    assert all("val_dropped_ndcg@10" in x for x in runs)
    best = max(runs, key=lambda x: (x["val_ndcg@10"] + x["val_dropped_ndcg@10"]) / 2)
    assert card["val_dropped_ndcg@10_within_retrieved"] == best["val_dropped_ndcg@10"]
