"""The benchmark suite behind BENCHMARKS.md: which runs it makes (`suite_jobs`: each a launcher and
its flags, writing JSON and plots under one directory) and the report formatted from their JSON
(`render`: nothing is typed in by hand; every target is checked against the measured numbers).
`launch/make_benchmarks.py` runs the jobs and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class SuiteSizes:
    """How large each run of the suite is (users per run, the TTFT grid, catalog scales)."""
    num_users: int = 30  # the serving workload (2 requests each) and the label-prompt mesh runs
    served_users: int = 943  # the served model's fidelity sweep
    ttft_users: int = 8  # the TTFT run at history 50 / 50 candidates
    ranker_users: int = 943  # the served ranker's accuracy + fidelity runs
    mesh_users: int = 100  # the placement runs on retrieved candidates
    grid_users: int = 6  # per point of the TTFT grid
    grid_history_lens: tuple[str, ...] = ()  # empty: no grid
    grid_candidates: tuple[str, ...] = ("20", "50", "100")
    catalog_scales: tuple[str, ...] = ("1", "10", "100")
    tuned_model: str | None = None  # a tuned block-aware model (launch/train_label.py <dir>/merged)


def _display(out: Path) -> str:
    """`out` as the report names it: relative to the checkout where it lies inside it."""
    try:
        return str(out.resolve().relative_to(ROOT))
    except ValueError:
        return str(out)


# bench_scaling.py runs: JSON name -> (section title, its flags)
SCALING_RUNS = {
    "scaling": ("devices x catalog size (sampled candidates)", lambda sizes: [
        f"--catalog_scales={','.join(sizes.catalog_scales)}", "--candidates=sampled", "--placements=similarity,hash",
        "--replicate=0"]),
    "scaling_retrieved": ("placements on retrieved candidates (the remote-bytes targets)", lambda sizes: [
        "--catalog_scales=1", "--device_counts=1,4,8", "--num_requests=943"]),
    "scaling_replication": ("co-access placement, local fraction vs replication budget", lambda sizes: [
        "--catalog_scales=1", "--device_counts=4,8", "--num_requests=943", "--placements=coaccess",
        "--replicate=0,0.02,0.05,0.1,0.2"]),
    "scaling_x100": ("TTFT at a x100 catalog vs x1 (co-access placement + replication; at x100 the requested "
                     "items, the real ones, fit in the replication budget, so affinity rows are all local: the "
                     "round_robin rows include remote fetches)", lambda sizes: [
        "--catalog_scales=1,100", "--device_counts=1,4,8", "--num_requests=200", "--placements=coaccess",
        "--replicate=0.1"]),
    "scaling_fetch": ("exact-size vs collective remote fetch", lambda sizes: [
        "--catalog_scales=1", "--device_counts=4,8", "--num_requests=200", "--placements=coaccess,hash",
        "--replicate=0.1", "--fetch=exact,collective"]),
}
GRID_MODES = "full,prefix,prefix_warm,rcllm"  # + the transformers rows hf_full, hf_prefix (--peers=transformers)
SERVED_MODES = "full,stitch,sink,deviation"  # rcllm's default is the stitch row's policy
# Budgets inside the recommender issue's 10% of cached block tokens: a sink of 1 per block, deviation 5%.
SERVED_BUDGETS = ["--sink=1", "--ratio=0.05", "--check_layer=1"]
# The sweep runs: row suffix -> (JSON, extra bench flags): the engine's default context at history 20
# (the table's main rows), the instruction context as before, and the default's policy at history 50.
SERVED_SWEEPS = {"": ("served_sweep.json", ["--history_len=20", f"--modes={SERVED_MODES}", *SERVED_BUDGETS]),
                 " (items after the instruction)": ("served_sweep_instruction.json",
                                                    ["--history_len=20", f"--modes={SERVED_MODES}", *SERVED_BUDGETS,
                                                     "--canonical=instruction"]),
                 " (history 50)": ("served_sweep_h50.json", ["--history_len=50", "--modes=full,rcllm"]),
                 " (glue cached)": ("served_sweep_glue.json", ["--history_len=20", "--modes=full,rcllm",
                                                               "--cached_glue"])}
RANKER_HISTORY = (20, 50)
RANKER_POSITIONS = "1-3"  # the test positions below the shipped head's validation position (4)
MESH_RETRIEVED_SHARDS = (4, 8)

WORKLOAD = ["--head=label", "--requests_per_user=2", "--num_candidates=20", "--history_len=20", "--cached_glue",
            "--modes=full,prefix,stitch,sink,deviation,rcllm", "--sweep=0.1,0.3,0.5"]


SERVED = ["--head=slot", "--candidates=retrieved", "--candidate_order=retriever", "--num_candidates=20", "--peers="]


def _served_runs(out: Path, sizes: SuiteSizes) -> dict:
    """The served model (score-slot head) on retrieved candidates: accuracy and a fidelity sweep
    over recompute budgets on --served_users test users, and TTFT at history 50 / 50 candidates."""
    sweeps = {f"served sweep{what}": [f"--num_users={sizes.served_users}", *SERVED, "--nowarmup",
                                      "--rank_retrieved_only", *extra,
                                      "--test_positions=1",  # one position: each row a pass over the requests
                                      f"--output_json={out / f}"]
              for what, (f, extra) in SERVED_SWEEPS.items()}
    return sweeps | {"served TTFT": [f"--num_users={sizes.ttft_users}", *SERVED[:3], "--num_candidates=50", "--peers=",
                                     "--history_len=50",  # sink: its default 2 (--sink would also set rcllm's)
                                     "--modes=full,prefix,prefix_warm,sink,rcllm",
                                     f"--output_json={out / 'served_ttft_h50_c50.json'}"]}


# LlamaRec (Yue et al. 2023), ML-100k, its Table 2: (NDCG@10, Recall@10) over the full catalog
LLAMAREC_PUBLISHED = {"LRURec (its retriever)": (0.0705, 0.1426), "LlamaRec (Llama-2-7B QLoRA)": (0.0759, 0.1524)}
SLICE_RUNS = ("warm", "few_items", "new_items", "new_users")  # bench.py --slice: what the LLM adds on each


def _slice_runs(out: Path, sizes: SuiteSizes) -> dict:
    """The shipped ranker on each cold-start slice (positions 1-3, history 20, fits without the
    cold items and users): accuracy, the collaborative-only ablation and content rows, fidelity;
    and on the LlamaRec protocol (5-core ML-100k, the last item, every test user)."""
    runs = {f"slice {s}": [f"--num_users={sizes.ranker_users}", *SERVED, "--history_len=20", "--nowarmup",
                           "--rank_retrieved_only", "--modes=full,rcllm", f"--test_positions={RANKER_POSITIONS}",
                           f"--slice={s}", f"--output_json={out / f'slice_{s}.json'}"] for s in SLICE_RUNS}
    runs["llamarec protocol"] = [f"--num_users={sizes.ranker_users}", *SERVED, "--history_len=20", "--nowarmup",
                                 "--rank_retrieved_only", "--modes=rcllm", "--test_positions=1",
                                 "--min_interactions=5", f"--output_json={out / 'llamarec_protocol.json'}"]
    return runs


def _ranker_runs(out: Path, sizes: SuiteSizes) -> dict:
    """The shipped ranker on the test targets held back at positions 1-3 of every user, at history
    20 and 50: accuracy (rcllm and full, with the retriever / collaborative / popularity / random
    rows) and rcllm's fidelity to full prefill, over --ranker_users (the model runs only where the
    target was retrieved; the rest are misses either way). Its training log is `launch/train.py`'s
    train_log.json, copied to ranker_train.json."""
    return {f"ranker h{h}": [f"--num_users={sizes.ranker_users}", *SERVED, f"--history_len={h}", "--nowarmup",
                             "--rank_retrieved_only", "--modes=full,rcllm", f"--test_positions={RANKER_POSITIONS}",
                             f"--output_json={out / f'served_ranker_h{h}.json'}"] for h in RANKER_HISTORY}


def _ranker_test_table(h: int, d: dict) -> list[str]:
    """The served ranker's test run at history h: every row with intervals, per position, checks."""
    c = d["config"]
    k = c["num_candidates"]
    recall = (c.get("retriever") or {}).get(f"recall@{k}", float("nan"))
    pos = c.get("test_positions") or []
    who = (f"{c['num_users']} test users x positions {pos[0]}-{pos[-1]} from the end of each sequence = "
           f"{c['num_requests']} requests, each with a retriever fitted before its target, intervals "
           "resampling users" if pos else f"{c['num_requests']} test users")
    head = ("the shipped head" if c.get("head_digest") == _shipped_head_digest() else
            f"an earlier head ({c.get('head_digest')}), not the shipped one")
    lines = [f"**Test, history {h}** (`python launch/bench.py {' '.join(c.get('argv', []))}`; {head}; "
              f"{who}; retriever recall@{k} {recall:.3f}, the model run on the "
              f"{c.get('requests_run', c['num_requests'])} whose target was retrieved):", "",
              "| row | NDCG@10 within retrieved [95% CI] | minus retriever [paired 95% CI] | HR@10 within | "
              "HR@10 all | NDCG@10 all | top-1 agr. vs full | KL |"
              + "".join(f" within, pos. {p} |" for p in pos),
              "|---|---|---|---|---|---|---|---|" + "---|" * len(pos)]
    for r in d["results"]:
        ci = r.get("ndcg@10_retrieved_ci") or [None, None]
        dv, dci = r.get("ndcg@10_retrieved_minus_retriever"), r.get("ndcg@10_retrieved_minus_retriever_ci")
        vs = "-" if dv is None else f"{dv:+.3f} [{dci[0]:+.3f}, {dci[1]:+.3f}]"
        by = r.get("ndcg@10_retrieved_by_position") or {}
        name = r["mode"] if not r.get("policy") else f"{r['mode']} ({_policy_text(r['policy'], _canonical(c))}" + (
            ")" if r is _default_rcllm_row(d) else ": not today's rcllm default)")
        lines.append(f"| {name} | {_fmt(r.get('ndcg@10_retrieved'))} [{_fmt(ci[0])}, {_fmt(ci[1])}] | {vs} | "
                     f"{_fmt(r.get('hr@10_retrieved'))} | {_fmt(r.get('hr@10'))} | {_fmt(r.get('ndcg@10'))} | "
                     f"{_fmt(r.get('top1_agreement'))} | {_fmt(r.get('kl_mean'), '.4f')} |"
                     + "".join(f" {_fmt(by.get(str(p)))} |" for p in pos))
    if pos:
        rec = c["retriever"].get(f"recall@{k}_by_position") or {}
        lines.append("")
        lines.append("Retriever recall@" + f"{k} by position: "
                     + ", ".join(f"{p}: {_fmt(rec.get(str(p)))}" for p in pos) + ".")
    lines.append("")
    lines += [f"- {x}" for x in _ranker_checks(d)] + [""]
    return lines


def _ci(r: dict, key: str) -> str:
    lo, hi = r[key + "_ci"]
    return f"{r[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _slices_section(out: Path) -> list[str]:
    """What the LLM adds on each cold-start slice (`bench.py --slice`), and the served ranker on the
    LlamaRec protocol."""
    runs = {s: out / f"slice_{s}.json" for s in SLICE_RUNS}
    have = {s: json.loads(f.read_text()) for s, f in runs.items() if f.exists()}
    if not have:
        return []
    d0 = next(iter(have.values()))
    cold = d0["config"]["cold"]
    lines = ["## What the LLM adds, slice by slice (`bench.py --slice`)", "",
             f"The shipped ranker (head {d0['config']['head_digest'][:8]}) on ML-100k's test positions "
             f"{RANKER_POSITIONS}, history {d0['config']['history_len']}, {d0['config']['num_candidates']} retrieved "
             "candidates; every fit (retrievers, popularity) leaves out the cold items and users "
             f"(`data/slices.py`: {cold['new_items']} new items, {cold['new_users']} new users; few = target with <= "
             f"{cold['few']} fitted interactions). NDCG@10 within the retrieved; `collaborative only` is the head "
             "with its slot-state weights zeroed (`SlotHead.collaborative_only`), so rcllm minus it is what the "
             "LLM adds (paired 95% interval over users); `content` ranks by the retriever's text similarity. "
             "Fidelity: rcllm vs full prefill on the engine's own scores (before the collaborative term).",
             ""] + _slice_table(have)
    lines += [""] + _slice_targets(have) + [""] + _cold_head_lines(out)
    f = out / "llamarec_protocol.json"
    if f.exists():
        d = json.loads(f.read_text())
        rows = _rows(d)
        c = d["config"]
        lines += [f"**The LlamaRec protocol, the served ranker** ({c['dataset']}: users and items with >= 5 "
                  f"interactions, {c['num_requests']} test users, the last item, {c['num_candidates']} retrieved by "
                  "item-kNN fitted on everything before it, a target not retrieved = a miss; NDCG@10 and Recall@10 "
                  "over every test user, 95% bootstrap intervals). LlamaRec's figures are its paper's (Table 2; its "
                  "retriever LRURec is fitted on the training part only, ours also saw each user's validation item).",
                  "", "| ranker | NDCG@10 | Recall@10 |", "|---|---|---|"]
        for m in ("rcllm", "collaborative_only", "retriever"):
            if m in rows:
                r = rows[m]
                lines.append(f"| {m} | {r['ndcg@10']:.4f} [{r['ndcg@10_ci'][0]:.4f}, {r['ndcg@10_ci'][1]:.4f}] | "
                             f"{r['hr@10']:.4f} [{r['hr@10_ci'][0]:.4f}, {r['hr@10_ci'][1]:.4f}] |")
        lines += [f"| {n} (published) | {a:.4f} | {b:.4f} |" for n, (a, b) in LLAMAREC_PUBLISHED.items()] + [""]
        if "rcllm" in rows:
            r, (a, b) = rows["rcllm"], LLAMAREC_PUBLISHED["LlamaRec (Llama-2-7B QLoRA)"]
            for name, key, pub in (("NDCG@10", "ndcg@10", a), ("Recall@10", "hr@10", b)):
                lo = r[key + "_ci"][0]
                lines.append(f"- {name}: rcllm {r[key]:.4f} vs LlamaRec {pub:.4f} (target above: "
                             f"{_met(r[key] > pub)}; aim above by more than our interval, lower end {lo:.4f}: "
                             f"{_met(lo > pub)})")
            lines.append("")
    return lines


def _rows(d: dict) -> dict:
    """A bench.py JSON's result rows by mode."""
    return {r["mode"]: r for r in d["results"]}


def _slice_table(have: dict) -> list[str]:
    """One row per slice run (bench.py --slice JSON): NDCG@10 within the retrieved per row, what the
    LLM adds with its interval, and rcllm's fidelity to full prefill."""
    lines = ["| slice | requests (target retrieved) | rcllm | full | collaborative only | content | popularity | "
             "retriever | random | rcllm - collaborative only | top-1 / tau / KL vs full |", "|---" * 11 + "|"]
    for s, d in have.items():
        rows = _rows(d)
        rc = rows.get("rcllm")
        if rc is None or "ndcg@10_retrieved" not in rc:
            continue

        def v(m):
            return _fmt(rows[m]["ndcg@10_retrieved"]) if "ndcg@10_retrieved" in rows.get(m, {}) else "-"
        fid = (f"{rc['engine_top1_agreement']:.3f} / {rc['engine_kendall_tau']:.3f} / {rc['engine_kl_mean']:.4f}"
               if "engine_top1_agreement" in rc else "-")
        lines.append(f"| {s} | {d['config']['num_requests']} ({d['config']['requests_run']}) | {v('rcllm')} | "
                     f"{v('full')} | {v('collaborative_only')} | {v('content')} | {v('popularity')} | "
                     f"{v('retriever')} | {v('random')} | "
                     f"{_ci(rc, 'ndcg@10_retrieved_minus_collaborative_only')} | {fid} |")
    return lines


# cold-aware training experiments (launch/train.py --cold_split ...): (training log, prefix of its
# bench.py --slice runs), each in docs/benchmarks
COLD_HEADS = (("ranker_train_cold.json", "cold_head_slice"), ("ranker_train_cold_content.json", "content_head_slice"),
              ("ranker_train_cold_content_p10.json", "content_p10_head_slice"))


def _cold_head_lines(out: Path) -> list[str]:
    """The cold-aware training experiments (`train.py --cold_split`, `--cold_dropout`,
    `--side_features`): each one's validation per L2 and its rows on the slices it was run on,
    beside the shipped head's above."""
    lines = []
    for log_name, prefix in COLD_HEADS:
        f = out / log_name
        if not f.exists():
            continue
        log = json.loads(f.read_text())
        card = log["card"]
        features = card.get("collaborative", {}).get("features", [])
        offered = sorted(r["l2"] for r in log["stage1"])
        won = max(log["stage1"], key=lambda r: r["selection"])["l2"]
        dropout = (f"in a share {card['cold_dropout']:g} of the examples each candidate's interaction-borne "
                   "features were replaced by a cold item's with probability 0.5 (stages 0 and 1). "
                   if card.get("cold_dropout") else "")
        took = (f"{log['stage1_s'] / 60:.0f} min of stage 1" if log["stage1_s"] >= 60 else
                "stage 1's slot states reused from an earlier run of the same examples")
        lines += [f"**Cold-aware training** (`{card['command']}`, {took}): "
                  f"trained in the world before the cold items and users, the head weighing {', '.join(features)}; "
                  + dropout + "Validation NDCG@10 within the retrieved per L2 (clean / with dropped features): "
                  + ", ".join(f"{r['l2']:g}: {r['val_ndcg@10']:.3f} / {r.get('val_dropped_ndcg@10', float('nan')):.3f}"
                              for r in log["stage1"])
                  + f"; the collaborative scorer alone {log['stage0']['val_ndcg@10']:.3f} (clean). L2 {won:g} won"
                  + (" (the strongest offered: the less the slot states move the scores, the better)."
                     if won == offered[-1] else f" (not the strongest offered, {offered[-1]:g})."), ""]
        have = {s: json.loads(g.read_text()) for s in SLICE_RUNS if (g := out / f"{prefix}_{s}.json").exists()}
        if have:
            c = next(iter(have.values()))["config"]
            pos = c["test_positions"]
            warm = []
            if "warm" in have and (out / "slice_warm.json").exists():
                shipped = _rows(json.loads((out / "slice_warm.json").read_text()))["rcllm"]["ndcg@10_retrieved"]
                mine = _rows(have["warm"])["rcllm"]["ndcg@10_retrieved"]
                warm = [f"- warm targets: rcllm {mine:.3f} vs the shipped head's {shipped:.3f} on the same slice "
                        f"(no loss: {_met(mine >= shipped)})"]
            lines += ([f"This head (head {c['head_digest'][:8]}) on the slices at test positions "
                       f"{min(pos)}-{max(pos)}:", ""] + _slice_table(have) + ["", "Issue 37's targets with this head:"]
                      + _slice_targets(have) + warm + [""])
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _slice_targets(have: dict) -> list[str]:
    """Issue 37's targets per slice, read off the runs."""
    rows = {s: _rows(d) for s, d in have.items()}

    def ndcg(s, m):
        return rows[s].get(m, {}).get("ndcg@10_retrieved")
    out = []
    if "few_items" in rows and ndcg("few_items", "rcllm") is not None:
        rc = rows["few_items"]["rcllm"]
        key = "ndcg@10_retrieved_minus_collaborative_only"
        d, (lo, _) = rc[key], rc[key + "_ci"]
        above = all(ndcg("few_items", "rcllm") > (ndcg("few_items", m) or 0) for m in ("content", "popularity"))
        out.append(f"- few-interaction targets: rcllm minus collaborative only {d:+.3f} (target >= +0.05 with the "
                   f"interval above 0: {_met(d >= 0.05 and lo > 0)}); rcllm above content and popularity: "
                   f"{_met(above)}")
    if "new_items" in rows and ndcg("new_items", "rcllm") is not None:
        rc, pop, knn, con = (ndcg("new_items", m) or 0.0 for m in ("rcllm", "popularity", "retriever", "content"))
        ok = rc > 0 and rc >= 2 * max(pop, knn) and rc > con
        out.append(f"- new-item targets: rcllm {rc:.3f} vs popularity {pop:.3f}, retriever (kNN fallback) {knn:.3f}, "
                   f"content {con:.3f} (target >= 2x the first two and above content: {_met(ok)})")
    fid = [s for s in rows if "engine_top1_agreement" in rows[s].get("rcllm", {})]
    if fid:
        ok = all(rows[s]["rcllm"]["engine_top1_agreement"] >= 0.95 and rows[s]["rcllm"]["engine_kendall_tau"] >= 0.9
                 and rows[s]["rcllm"]["engine_kl_mean"] <= 0.01 and rows[s]["rcllm"]["recompute_fraction"] <= 0.1
                 for s in fid)
        out.append(f"- rcllm vs full prefill on every slice ({', '.join(fid)}): top-1 >= 0.95, tau >= 0.9, KL <= 0.01 "
                   f"on the engine's scores at <= 10% recomputed: {_met(ok)}")
    return out


def _ranker_section(out: Path) -> list[str]:
    """The served ranker: how it was trained (stage 0 / 1 / 2 on validation), and its test
    accuracy and fidelity at each history length."""
    t = out / "ranker_train.json"
    if not t.exists():
        return []
    log = json.loads(t.read_text())
    card = log["card"]
    best1 = max(log["stage1"], key=lambda r: r["val_ndcg@10"])
    s0, s2 = log.get("stage0") or {}, log.get("stage2") or {}
    lines = ["## The served ranker: score-slot head over collaborative features (training and test)", "",
             f"Trained by `{card['command']}`: "
             + (f"stage 0 fitted the collaborative scorer (features {', '.join(card['collaborative']['features'])} "
                f"and the position) on {s0['examples']} examples (targets held back at positions {s0['positions']}, "
                "no model pass); " if s0 else "")
             + f"stage 1 fitted the head{' over it' if s0 else ''} on the slot states of {card['train_examples']} "
             f"examples (positions {card.get('positions') or [int(k.split('_')[1]) for k in log.get('train_stats', {})]}), "
             "each with a retriever fitted before its "
             f"target; {card['val_examples']} validation examples ("
             + (f"position {card['validation_position']}" if card.get("validation_position") else
                "leave-one-out validation targets")
             + f" targets the retriever put in its top-{card['num_candidates']}). Stage 1 "
             + (f"took {log['stage1_s'] / 60:.0f} min (every example served once)" if log["stage1_s"] > 60 else
                "reused the states and prefixes of an earlier run with the same examples") +
             (f", stage 2 {s2['curve'][-1]['wall_s'] / 60:.0f} min for {s2['curve'][-1]['step']} steps x "
              f"{s2['config']['batch_size']} examples." if s2 else "; stage 2 (the query adapter) was not run."), "",
             "| validation, NDCG@10 within the retrieved | value |", "|---|---|",
             f"| retriever's own order | {_fmt(card.get('val_retriever_ndcg@10_within_retrieved'))} |",
             f"| random order | {_fmt(card.get('val_random_ndcg@10_within_retrieved'))} |"]
    if s0:
        lines.append(f"| stage 0: collaborative scorer alone (no LLM) | {_fmt(s0['val_ndcg@10'])} |")
    what = "head over the collaborative scorer" if s0 else "head alone"
    lines += [f"| stage 1: {what}, L2 {r['l2']:g} | {_fmt(r['val_ndcg@10'])} |" for r in log["stage1"]]
    for r in [r for r in s2.get("curve", []) if "val_ndcg@10" in r and r["step"] > 0]:
        lines.append(f"| stage 2: head + query adapter, step {r['step']} ({r['wall_s'] / 60:.0f} min) | "
                     f"{_fmt(r['val_ndcg@10'])} |")
    lines.append("")
    lines.append(f"Stage 1's best L2 was {best1['l2']:g} (validation NDCG@10 {best1['val_ndcg@10']:.3f}). The shipped "
                 "head (`rcllm_jax/assets/slot_head/`, card in its README) is what serve.py, recommend.py and "
                 "`bench.py --head=slot` use.")
    if s2:
        final = s2["val_ndcg@10"]
        lines[-1] += (f" Stage 2 ended at {final:.3f}: the query adapter "
                      f"{'added' if final > best1['val_ndcg@10'] else 'did not add'} to stage 1 in this budget. "
                      f"Learning curve: [ranker_learning_curve.png]({out.as_posix()}/ranker_learning_curve.png)")
    qa = out / "ranker_train_query_adapter.json"
    if qa.exists():  # the earlier run that trained the query adapter (stage 2), before stage 0 existed
        q = json.loads(qa.read_text())
        q1, q2 = max(r["val_ndcg@10"] for r in q["stage1"]), q["stage2"]
        lines[-1] += (f" An earlier run trained the query adapter (stage 2, no collaborative features, "
                      f"`{q['card']['command']}`): {q2['curve'][-1]['step']} steps x {q2['config']['batch_size']} "
                      f"examples in {q2['curve'][-1]['wall_s'] / 60:.0f} min ended at validation NDCG@10 "
                      f"{q2['val_ndcg@10']:.3f} vs {q1:.3f} for its head alone "
                      f"([learning curve]({out.as_posix()}/ranker_learning_curve_query_adapter.png), "
                      "[log](" + f"{out.as_posix()}/ranker_train_query_adapter.json)); "
                      "so the CPU schedule stops after stage 1.")
    lines.append("")
    for h in RANKER_HISTORY:
        f = out / f"served_ranker_h{h}.json"
        if f.exists():
            lines += _ranker_test_table(h, json.loads(f.read_text()))
    return lines


def _bench_runs(out: Path, sizes: SuiteSizes) -> dict:
    runs = _served_runs(out, sizes) | _ranker_runs(out, sizes) | _slice_runs(out, sizes) | {
        "zero-shot": [f"--num_users={sizes.num_users}", *WORKLOAD, f"--output_json={out / 'zeroshot.json'}"]}
    if sizes.tuned_model:
        runs["tuned block-aware"] = [f"--num_users={sizes.num_users}", *WORKLOAD, f"--model={sizes.tuned_model}",
                                     f"--output_json={out / 'tuned.json'}"]
    for h in sizes.grid_history_lens:
        for c in sizes.grid_candidates:
            runs[f"grid h{h} c{c}"] = [f"--num_users={sizes.grid_users}", *SERVED[:3], f"--num_candidates={c}",
                                       f"--history_len={h}", f"--modes={GRID_MODES}", "--peers=transformers",
                                       f"--output_json={out / f'grid_h{h}_c{c}.json'}"]
    for p in ("similarity", "hash"):
        runs[f"mesh {p}"] = [f"--num_users={sizes.num_users}", "--modes=rcllm", "--head=label", "--negatives=retrieval",
                             "--mesh=items:4", f"--placement={p}", "--user_cache_pages=512", "--peers=",
                             f"--output_json={out / f'mesh_{p}.json'}"]
    for n in MESH_RETRIEVED_SHARDS:  # the retrieval stage's candidates; every placement's locality on the stream
        runs[f"mesh retrieved items:{n}"] = [f"--num_users={sizes.mesh_users}", "--modes=rcllm", *SERVED,
                                             f"--mesh=items:{n}", "--placement=coaccess", "--user_cache_pages=512",
                                             "--nowarmup",
                                             f"--output_json={out / f'mesh_retrieved_items{n}.json'}"]
    return runs


def needed_budget(rows, top1: float):
    """(mode, recompute fraction) of the cheapest block row keeping top-1 agreement >= top1: fewest
    tokens computed per request (glue included), then the smallest recompute fraction."""
    ok = [r for r in rows if r.get("recompute_fraction") is not None and (r.get("top1_agreement") or 0) >= top1]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: (r.get("computed_tokens_p50") or 0, r["recompute_fraction"], r["ttft_p50_s"]))
    return best["mode"], best["recompute_fraction"]


def _policy_text(p: dict, canonical: str | None = None) -> str:
    """A block row's policy; with `canonical` (a run's config), also where its item blocks were encoded."""
    parts = [f"sink {p['sink']}"] if p.get("sink") else []
    if p.get("ratio"):
        parts.append(f"deviation {p['ratio']:g} @ layer {p['check_layer']}")
    parts.append("glue cached" if p.get("cached_glue") else "glue fresh")
    if canonical is not None:
        parts.append("items after their glue" if canonical == "candidate" else f"items after the {canonical} alone")
    return ", ".join(parts)


def _default_policy() -> dict:
    """Today's rcllm policy, as the JSON files record a block row's policy."""
    import dataclasses

    from rcllm_jax.engine.selective_recompute import BLOCK_MODES
    return dataclasses.asdict(BLOCK_MODES["rcllm"])


def _canonical(config: dict) -> str:
    """Where a run's item blocks were encoded (runs before the field existed: the instruction)."""
    return config.get("canonical") or "instruction"


def _default_canonical() -> str:
    """Today's context item blocks are encoded after."""
    from rcllm_jax.engine.engine import DEFAULT_CANONICAL
    return DEFAULT_CANONICAL


def _is_default(policy: dict | None, canonical: str, ignore_glue: bool = False) -> bool:
    """Whether a block row ran as today's rcllm default: its policy and its item blocks' context."""
    want = _default_policy()
    if policy is None:
        return False
    if ignore_glue:
        policy, want = {**policy, "cached_glue": False}, {**want, "cached_glue": False}
    return policy == want and canonical == _default_canonical()


def _default_text() -> str:
    return _policy_text(_default_policy(), _default_canonical())


def _default_rcllm_row(d: dict):
    """The row run with today's rcllm default (a JSON may predate a change of the default)."""
    return next((r for r in d["results"] if _is_default(r.get("policy"), _canonical(d["config"]))), None)


def _shipped_head_digest() -> str:
    from rcllm_jax.engine.ranking_head import DEFAULT_HEAD, SlotHead
    return SlotHead.load(DEFAULT_HEAD).digest()


def _ranker_checks(d: dict) -> list[str]:
    """The recommender issue's accuracy and fidelity targets, checked on one ranker test run."""
    rows = _rows(d)
    rc, full, ret = rows.get("rcllm"), rows.get("full"), rows.get("retriever")
    out = []
    if rc and ret:
        x, y = rc["ndcg@10_retrieved"], ret["ndcg@10_retrieved"]
        lo, hi = rc["ndcg@10_retrieved_minus_retriever_ci"]
        out.append(f"rcllm NDCG@10 within the retrieved {x:.3f} vs the retriever's order {y:.3f} (at least as good: "
                   f"{'met' if x >= y else 'not met'}; above it by more than the paired 95% interval, "
                   f"[{lo:+.3f}, {hi:+.3f}]: {'met' if lo > 0 else 'not met'}); popularity "
                   f"{_fmt(rows.get('popularity', {}).get('ndcg@10_retrieved'))}, random "
                   f"{_fmt(rows.get('random', {}).get('ndcg@10_retrieved'))}")
        co = rows.get("collaborative")
        if co:
            out.append(f"what the LLM adds: rcllm {x:.3f} vs the head's collaborative scorer alone "
                       f"{co['ndcg@10_retrieved']:.3f} ({x - co['ndcg@10_retrieved']:+.3f})")
    if rc and full:
        dh, dn = 100 * (rc["hr@10"] - full["hr@10"]), 100 * (rc["ndcg@10"] - full["ndcg@10"])
        dhr = 100 * (rc["hr@10_retrieved"] - full["hr@10_retrieved"])
        dnr = 100 * (rc["ndcg@10_retrieved"] - full["ndcg@10_retrieved"])
        ok = min(dh, dn, dhr, dnr) >= -0.5
        out.append(f"rcllm vs full prefill: HR@10 {dh:+.1f} / NDCG@10 {dn:+.1f} pts over all users, {dhr:+.1f} / "
                   f"{dnr:+.1f} pts within the retrieved (within 0.5 pts: {'met' if ok else 'not met'}); top-1 "
                   f"agreement {rc['top1_agreement']:.3f} at {100 * rc['recompute_fraction']:.1f}% of cached block "
                   f"tokens recomputed ({_policy_text(rc['policy'], _canonical(d['config']))}"
                   + ("" if rc is _default_rcllm_row(d) else ", an earlier rcllm default than today's")
                   + "; >= 0.95 at <= 10%: "
                   f"{'met' if rc['top1_agreement'] >= 0.95 and rc['recompute_fraction'] <= 0.10 else 'not met'})")
    return out


def _served_default(out: Path, d: dict):
    """(every served sweep over the requests of `d`, the main sweep: the same history; the row run
    with today's rcllm default among them, or None). The default may be in any of them."""
    same = [d] + [dg for dg in (json.loads((out / n).read_text()) for n, _ in SERVED_SWEEPS.values()
                                if n != "served_sweep.json" and (out / n).exists())
                  if dg["config"]["history_len"] == d["config"]["history_len"]]
    return same, next((r for r in (_default_rcllm_row(dg) for dg in same) if r is not None), None)


def _served_section(out: Path, report_dir: Path) -> list[str]:
    """The served model on retrieved candidates: accuracy with intervals, fidelity vs budget,
    TTFT at history 50 / 50 candidates, and the recommender issue's targets checked."""
    f = out / "served_sweep.json"
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, rows = d["config"], _rows(d)
    r0 = c.get("retriever") or {}
    k = c["num_candidates"]
    shipped = c.get("head_digest") is not None and c["head_digest"] == _shipped_head_digest()
    which = "the shipped score-slot head" if shipped else f"an earlier score-slot head, {c.get('head_digest')}"
    lines = [f"## The served model: retrieve -> rerank ({which})", "",
             "The accuracy and fidelity sweep and the TTFT run are separate runs, possibly on different machines "
             "(compare ratios within a run, not absolute times across runs); the rcllm policy was chosen on the sweep."
             + ("" if shipped else " The sweep ran with an earlier head than the shipped one; the shipped head's "
                "test accuracy and fidelity are in the ranker section above, and TTFT does not depend on the "
                "head's weights."),
             "",
             f"Command: `python launch/bench.py {' '.join(c.get('argv', []))}`" if c.get("argv") else "",
             f"{c['dataset']} test targets of {c['num_requests']} users, item-kNN top-{k} in the retriever's order, "
             f"history {c['history_len']}, prompt p50 {c['prompt_tokens']['p50']:.0f} tokens; retriever recall@{k} "
             f"{r0.get(f'recall@{k}', float('nan')):.3f}. Within the retrieved: the requests whose target was "
             "retrieved; all: a target not retrieved is a miss. 95% bootstrap intervals. TTFT here includes "
             "compiles (--nowarmup: an accuracy run); TTFT is measured below.", "",
             "| row | policy | NDCG@10 within retrieved [95% CI] | HR@10 within | HR@10 all | NDCG@10 all | recomputed | "
             "top-1 agr. vs full | KL |", "|---|---|---|---|---|---|---|---|---|"]
    for what, (name, _) in SERVED_SWEEPS.items():
        g = out / name
        if not g.exists():
            continue
        dg = json.loads(g.read_text())
        for r in dg["results"]:
            if what and not r.get("policy") and dg["config"]["history_len"] == c["history_len"]:
                continue  # the same requests: full prefill and the baselines do not depend on the block context
            ci = r.get("ndcg@10_retrieved_ci") or [None, None]
            pol = _policy_text(r["policy"], _canonical(dg["config"])) if r.get("policy") else ""
            lines.append(f"| {r['mode']}{what} | {pol} | {_fmt(r.get('ndcg@10_retrieved'))} [{_fmt(ci[0])}, "
                         f"{_fmt(ci[1])}] | {_fmt(r.get('hr@10_retrieved'))} | {_fmt(r.get('hr@10'))} | "
                         f"{_fmt(r.get('ndcg@10'))} | {_fmt(r.get('recompute_fraction'))} | "
                         f"{_fmt(r.get('top1_agreement'))} | {_fmt(r.get('kl_mean'), '.4f')} |")
    lines.append("")
    checks = []
    same, rc = _served_default(out, d)
    block_rows = [r for dg in same for r in dg["results"] if r.get("policy")]
    full, ret = rows.get("full"), rows.get("retriever")
    if rc:
        where = next(dg for dg in same if any(r is rc for r in dg["results"]))
        checks.append(f"the rcllm default now ({_policy_text(rc['policy'], _canonical(where['config']))}) is the "
                      f"row **{rc['mode']}**" + ("" if where is d else
                                                 f" of `{' '.join(where['config'].get('argv', []))}`"))
    if rc and ret:
        lo = (ret.get("ndcg@10_retrieved_ci") or [0, 0])[1]
        x, y = rc["ndcg@10_retrieved"], ret["ndcg@10_retrieved"]
        checks.append(f"rcllm NDCG@10 within the retrieved {x:.3f} vs the retriever's order {y:.3f} (target: at "
                      f"least as good: {'met' if x >= y else 'not met'}; aim: above its interval's top {lo:.3f}: "
                      f"{'met' if x > lo else 'not met'})")
    if rc and full:
        dh, dn = 100 * (rc["hr@10"] - full["hr@10"]), 100 * (rc["ndcg@10"] - full["ndcg@10"])
        checks.append(f"rcllm vs full prefill: HR@10 {dh:+.1f} pts, NDCG@10 {dn:+.1f} pts (target within 0.5 pts or "
                      f"above: {'met' if min(dh, dn) >= -0.5 else 'not met'})")
        for top1 in (0.95, 0.99):
            mode, frac = needed_budget(block_rows, top1)
            ok = mode is not None and frac <= 0.10
            checks.append(f"cheapest block row with top-1 agreement >= {top1}: "
                          + ("none" if mode is None else f"{mode} at {100 * frac:.1f}% of block tokens recomputed")
                          + (f" (target <= 10%: {'met' if ok else 'not met'})" if top1 == 0.95 else ""))
    checks += _served_ttft_checks(out)
    lines += [f"- {x}" for x in checks] + [""]
    lines += _plot_links(f, c.get("plots", []), report_dir)
    return lines + [""]


def _served_ttft_checks(out: Path) -> list[str]:
    """The served model's TTFT at history 50 / 50 retrieved candidates against the targets, and
    the other block policies and prefix_warm of the same run."""
    checks = []
    t = out / "served_ttft_h50_c50.json"
    if t.exists():
        dt = json.loads(t.read_text())
        tr = _rows(dt)
        if "rcllm" in tr and "prefix" in tr:
            x = tr["prefix"]["ttft_p50_s"] / tr["rcllm"]["ttft_p50_s"]
            checks.append(f"TTFT p50 at history {dt['config']['history_len']} / {dt['config']['num_candidates']} "
                          f"retrieved candidates ({dt['config']['prompt_tokens']['p50']:.0f}-token prompts, "
                          f"{dt['config']['num_requests']} requests, compiles excluded): rcllm "
                          f"({_policy_text(tr['rcllm']['policy'], _canonical(dt['config']))}"
                          + ("" if _is_default(tr["rcllm"]["policy"], _canonical(dt["config"])) else
                             ": an earlier rcllm default") + ") "
                          f"{1e3 * tr['rcllm']['ttft_p50_s']:.0f} ms, "
                          f"prefix {1e3 * tr['prefix']['ttft_p50_s']:.0f} ms, "
                          f"full {1e3 * tr['full']['ttft_p50_s']:.0f} ms: **{x:.1f}x** vs prefix (target >= 10x: "
                          f"{'met' if x >= 10 else 'not met'}), {tr['full']['ttft_p50_s'] / tr['rcllm']['ttft_p50_s']:.1f}x "
                          f"vs full; rcllm top-1 agreement there {_fmt(tr['rcllm'].get('top1_agreement'))}"
                          + ("" if dt["config"].get("head_digest") == _shipped_head_digest() else
                             " (run with an earlier head; the engine's TTFT does not depend on the head's weights, "
                             "and the collaborative term is added outside it)"))
            for m in ("stitch", "sink", "deviation"):
                st = tr.get(m)
                if st is None or st.get("policy") == tr["rcllm"].get("policy"):
                    continue
                checks.append(f"the same run, {m} ({_policy_text(st['policy'])}, {st['computed_tokens_p50']:.0f} "
                              f"tokens computed vs rcllm's {tr['rcllm']['computed_tokens_p50']:.0f}): "
                              f"{1e3 * st['ttft_p50_s']:.0f} ms, {tr['prefix']['ttft_p50_s'] / st['ttft_p50_s']:.1f}x "
                              f"vs prefix, {st['ttft_p50_s'] / tr['rcllm']['ttft_p50_s']:.2f}x rcllm's TTFT (top-1 "
                              f"agreement over these few requests: {m} {_fmt(st.get('top1_agreement'))}, rcllm "
                              f"{_fmt(tr['rcllm'].get('top1_agreement'))})")
            if "prefix_warm" in tr:
                w = tr["prefix_warm"]
                xw = w["ttft_p50_s"] / tr["rcllm"]["ttft_p50_s"]
                checks.append(f"the same run, prefix_warm (the user's prefix pages computed at event time, "
                              f"{w['computed_tokens_p50']:.0f} tokens computed per request vs rcllm's "
                              f"{tr['rcllm']['computed_tokens_p50']:.0f}): {1e3 * w['ttft_p50_s']:.0f} ms, **{xw:.1f}x** "
                              f"rcllm's TTFT (target >= 5x: {'met' if xw >= 5 else 'not met'}); event-time cost "
                              f"p50 {_fmt(w.get('history_update_s_p50'), '.2f')} s (rcllm's user store: "
                              f"{_fmt(tr['rcllm'].get('history_update_s_p50'), '.2f')} s)")
    return checks


def _shutdown_save_section(f: Path) -> list[str]:
    """The server's memory while it saves the user store at shutdown, before / after streaming."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    lines = ["## Serving state: memory of the shutdown save (one session, same machine)", "",
             "| code | save | user prefixes | RSS serving | peak RSS while saving | added by the save |",
             "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['label']} ({r['commit']}) | {r['save']} | {r['prefixes']} | {r['rss_serving_gib']:.2f} GiB | "
                     f"{r['rss_peak_saving_gib']:.2f} GiB | {r['rss_peak_saving_gib'] - r['rss_serving_gib']:+.2f} GiB |")
    return lines + ["", f"- Server: `{d['server']}`; load: `{d['load']}`; then SIGTERM. {d['what']} (sampled every "
                        f"20 ms). The saved KV: {d['user_kv_bytes_after'] / 2**30:.2f} GiB on disk.", ""]


def _coaccess_section(out: Path) -> list[str]:
    """Placements on the retrieval stage's candidates: every placement's locality on the same stored
    blocks and stream (affinity routing), and what the run's own placement moved."""
    runs = [(n, out / f"mesh_retrieved_items{n}.json") for n in MESH_RETRIEVED_SHARDS]
    runs = [(n, f) for n, f in runs if f.exists()]
    if not runs:
        return []
    lines = ["## Sharded item store: co-access placement on retrieved candidates", "",
             "Each run ranks test users' item-kNN top-20 on a simulated mesh (affinity routing); the locality of "
             "every placement is computed on the same stored blocks and stream (`placement_locality`), the "
             "measured remote bytes are the run's own (coaccess). Times are not comparable here (the simulated "
             "devices share 2 cores; --nowarmup)."]
    if any("replicate" not in json.loads(f.read_text())["config"] for _, f in runs):
        lines.append("These runs predate the co-access log and replication: their coaccess partitions the "
                     "retriever's item-item similarities (the current placement: the Scaling sections below).")
    lines += ["", "| shards | placement | local fraction | remote blocks / request | remote MB / request | vs hash |",
             "|---|---|---|---|---|---|"]
    for n, f in runs:
        d = json.loads(f.read_text())
        loc = d["config"]["placement_locality"]
        hb = loc.get("hash", {}).get("remote_bytes_per_request")
        for p, r in loc.items():
            ratio = f"{hb / r['remote_bytes_per_request']:.1f}x fewer bytes" if hb and r["remote_bytes_per_request"] else "-"
            lines.append(f"| {n} | {p} | {r['local_fraction']:.3f} | {r['remote_blocks_per_request']:.2f} | "
                         f"{r['remote_bytes_per_request'] / 1e6:.2f} | {ratio if p != 'hash' else '-'} |")
        row = next(x for x in d["results"] if x["mode"] == "rcllm")
        lines.append(f"| {n} | coaccess, measured ({d['config']['num_requests']} requests) | {row['local_fraction']:.3f} | "
                     f"{row['remote_blocks_per_request']:.2f} | {row['remote_bytes_per_request'] / 1e6:.2f} | - |")
    return lines + [""]


def _load_section(out: Path) -> list[str]:
    """The HTTP server under load (launch/loadtest.py JSON files load_c*.json)."""
    files = sorted(out.glob("load_c*.json"), key=lambda f: int(f.stem[6:]))
    if not files:
        return []
    lines = ["## The server under load (`launch/serve.py` + `launch/loadtest.py`)", "",
             "| clients | users | sent | 200 | other statuses | requests/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 | "
             "requests/s x TTFT p50 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for f in files:
        d = json.loads(f.read_text())
        other = {k: v for k, v in d["status_counts"].items() if k != "200"}
        if d.get("retried_503"):
            other["503, resent after Retry-After"] = d["retried_503"]
        util = d["throughput_rps"] * d["ttft_p50_s"] if d.get("ttft_p50_s") else None
        lines.append(f"| {d['clients']} | {d.get('users', '-')} | {d['sent']} | {d['answered_200']} | {other or '-'} | "
                     f"{d['throughput_rps']:.2f} | {_fmt(d.get('ttft_p50_s'))} s | {_fmt(d.get('ttft_p99_s'))} s | "
                     f"{_fmt(d.get('latency_p50_s'))} s | {_fmt(d.get('latency_p99_s'))} s | {_fmt(util, '.2f')} |")
        if d.get("argv"):
            notes.append(f"`python launch/loadtest.py {' '.join(d['argv'])}`")
        if d["clients"] == 8 and util is not None:
            notes.append(f"8 clients: {d['throughput_rps']:.2f} requests/s vs 1 / TTFT p50 = {1 / d['ttft_p50_s']:.2f} "
                         f"(target: within 2x: {'met' if util >= 0.5 else 'not met'})")
    server = out / "load_server.txt"
    if server.exists():
        notes.insert(0, f"Server: `{server.read_text().strip()}` (default model and slot head, rcllm; the simulated "
                        "devices share the 2 CPU cores). TTFT: the engine's time per request as the server reports "
                        "it; latency: the client's, from its first try. Users: ML-100k users whose history prefix "
                        "is cached (returning users).")
    return lines + [""] + [f"- {n}" for n in notes] + [""]


def _load_modes_section(out: Path) -> list[str]:
    """Throughput under load per mode (launch/loadtest.py JSON files load_mode_*.json, one server each)."""
    files = sorted(out.glob("load_mode_*.json"))
    if not files:
        return []
    runs = [json.loads(f.read_text()) for f in files]
    lines = ["## Throughput under load per mode (`launch/serve.py --mesh=items:2 --mode=M` + `launch/loadtest.py`)", "",
             "| mode | serving step | run on | sent | 503 resent | requests/s | TTFT p50 | TTFT p99 | latency p50 | "
             "latency p99 | compiles during the run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(runs, key=lambda d: -d["throughput_rps"]):
        sv = d.get("server", {})
        pol = f" ({_policy_text(sv['policy'], _canonical(sv))})" if sv.get("policy") else ""
        run_on = d.get("date", "before 2026-12-05")
        lines.append(f"| {sv.get('mode')}{pol} | {sv.get('serving_step') or '-'} | {run_on} | "
                     f"{d['sent']} | "
                     f"{d.get('retried_503', 0)} | "
                     f"{d['throughput_rps']:.2f} | {_fmt(d.get('ttft_p50_s'))} s | {_fmt(d.get('ttft_p99_s'))} s | "
                     f"{_fmt(d.get('latency_p50_s'))} s | {_fmt(d.get('latency_p99_s'))} s | "
                     f"{_fmt(d.get('compiles_during_run'), 'd')} |")
    by = {}
    for d in runs:
        m = d.get("server", {}).get("mode")
        if m not in by or d["throughput_rps"] > by[m]["throughput_rps"]:
            by[m] = d
    notes = [f"{runs[0]['clients']} clients, {runs[0]['users']} returning users (one untimed request each first), "
             "a 503 resent after its Retry-After (latency counts from the first try); one server per row, the "
             "simulated devices share the 2 CPU cores; TTFT: the engine's time for the request (in a batched "
             "step: the step's), latency: the client's.",
             "`python launch/loadtest.py " + " ".join(a for a in runs[0].get("argv", [])
                                                     if not a.startswith(("--url", "--output_json", "--requests=")))
             + "`"]
    if "rcllm" in by:
        rc = by["rcllm"]
        if not _is_default(rc["server"].get("policy"), _canonical(rc["server"])):
            notes.append("the rcllm server ran with " + (f"the policy {_policy_text(rc['server']['policy'])}" if
                         rc["server"].get("policy") else "an unrecorded policy (before health reported it)")
                         + f" (item blocks after the {_canonical(rc['server'])} context), not today's rcllm default "
                         f"({_default_text()})")
        for peer, want in (("prefix_warm", 5), ("full", None)):
            if peer in by:
                x = rc["throughput_rps"] / by[peer]["throughput_rps"]
                ok_p99 = rc["latency_p99_s"] <= by[peer]["latency_p99_s"]
                notes.append(f"rcllm ({rc['server'].get('serving_step')}) vs {peer}: **{x:.1f}x** the requests/s, "
                             f"latency p99 {rc['latency_p99_s']:.2f} vs {by[peer]['latency_p99_s']:.2f} s"
                             + (f" (target >= {want}x at the same p99: {'met' if x >= want and ok_p99 else 'not met'})"
                                if want else ""))
    return lines + [""] + [f"- {n}" for n in notes] + [""]


def _state_section(out: Path) -> list[str]:
    """The serving state (issue 34): events/s of the state database alone (launch/bench_state.py,
    state_db.json) and through the server (loadtest --kind=events, events_c8.json), and the
    recommend load before / after the state changes in one session (state_load_before.json,
    state_load_after.json: the same loadtest against the default server of each commit)."""
    lines = []
    f = out / "state_db.json"
    if f.exists():
        d = json.loads(f.read_text())
        lines += ["## Serving state: events committed per second", "",
                  f"`python launch/bench_state.py --clients={d['clients']} --duration_s={d['duration_s']:g} "
                  "--postgres` "
                  f"({d['date']}, {d['cores']} cores; each event one transaction, answered after its commit):", "",
                  "| backend | events/s | commit p50 | commit p99 | every event stored |", "|---|---|---|---|---|"]
        for name, r in d["results"].items():
            lines.append(f"| {name} | {r['events_per_s']:.0f} | {r['commit_p50_ms']:.2f} ms | "
                         f"{r['commit_p99_ms']:.2f} ms | {r['all_stored']} |")
        lines.append("")
    f = out / "events_c8.json"
    if f.exists():
        d = json.loads(f.read_text())
        argv = " ".join(a for a in d["argv"] if not a.startswith(("--url", "--output_json")))
        lines += [f"Through the default server (`python launch/loadtest.py {argv}`, "
                  f"{d['date']}; each event also brings the user's history prefix up to date in the user store): "
                  f"**{d['throughput_rps']:.1f} events/s**, latency p50 {_fmt(d['latency_p50_s'])} s, p99 "
                  f"{_fmt(d['latency_p99_s'])} s, statuses {d['status_counts']}, "
                  f"{d['retried_503']} resent after a 503; users holding other than their acknowledged events: "
                  f"{d['users_with_other_than_acknowledged_events']} of {d['users']}.", ""]
    runs = {k: out / f"state_load_{k}.json" for k in ("before", "after")}
    if all(f.exists() for f in runs.values()):
        b, a = (json.loads(runs[k].read_text()) for k in ("before", "after"))
        lines += ["## Serving state: recommend throughput before / after (one session, same machine)", "",
                  "| commit | requests/s | TTFT p50 | latency p50 | latency p99 | 503 resent | compiles during the "
                  "run |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in (("before (4bc68ea)", b), ("after", a)):
            lines.append(f"| {name} | {d['throughput_rps']:.2f} | {_fmt(d['ttft_p50_s'])} s | "
                         f"{_fmt(d['latency_p50_s'])} s | {_fmt(d['latency_p99_s'])} s | {d.get('retried_503', 0)} | "
                         f"{_fmt(d.get('compiles_during_run'), 'd')} |")
        x, p99 = a["throughput_rps"] / b["throughput_rps"], a["latency_p99_s"] / b["latency_p99_s"]
        lines += ["", f"- `python launch/serve.py --mesh=items:2` + `python launch/loadtest.py "
                      f"{' '.join(a_ for a_ in a['argv'] if not a_.startswith(('--url', '--output_json')))}` "
                      f"({a['date']}): after / before = {x:.3f}x the requests/s, {p99:.3f}x the latency p99 (target: "
                      f"no worse than 5%: {'met' if x >= 0.95 and p99 <= 1.05 else 'not met'}; runs of one code differ "
                      "by ~15% on this VM)."]
        if a.get("server_rss_gib_after"):
            lines.append(f"- Server RSS after the run: {a['server_rss_gib_after']:.2f} GiB (its /metrics).")
        if (out / "state_server_save.txt").exists():
            lines.append(f"- Its shutdown save (the server's log): `{(out / 'state_server_save.txt').read_text().strip()}`.")
        lines.append("")
    return lines + _admission_section(out)


def _admission_section(out: Path) -> list[str]:
    """Admission by count (before) and by estimated engine time (after, new users costing the
    warm-up's new-user time), one server per commit and traffic, in one session:
    admission_{before,after}_{new,warm}.json (loadtest reports) and admission_{...}.txt (the
    server's queue-bound log line)."""
    runs = {(c, t): out / f"admission_{c}_{t}.json" for c in ("before", "after") for t in ("new", "warm")}
    if not all(f.exists() for f in runs.values()):
        return []
    d = {k: json.loads(f.read_text()) for k, f in runs.items()}
    lines = ["## Admission: new users against the latency target (one session, same machine)", "",
             "| traffic | admission | answered/s | server latency p50 | p99 | client latency p50 | p99 | 503 resent | "
             "compiles |", "|---|---|---|---|---|---|---|---|---|"]
    f = out / "admission_after_new_jittered.json"  # the same, clients resending after a jittered wait
    jittered = json.loads(f.read_text()) if f.exists() else None
    for t, what in (("new", "every request a new user"), ("warm", "50 returning users")):
        rows = [(d[(c, t)], how) for c, how in (("before", "count"), ("after", "count + cost"))]
        if t == "new" and jittered:
            rows.append((jittered, "count + cost, clients `--backoff=jittered`"))
        for r, how in rows:
            lines.append(f"| {what} | {how} | {r['throughput_rps']:.2f} | {_fmt(r.get('server_latency_p50_s'))} s | "
                         f"{_fmt(r.get('server_latency_p99_s'))} s | {_fmt(r['latency_p50_s'])} s | "
                         f"{_fmt(r['latency_p99_s'])} s | {r['retried_503']} | "
                         f"{_fmt(r.get('compiles_during_run'), 'd')} |")
    a = d[("after", "new")]
    argv = " ".join(x for x in a["argv"] if not x.startswith(("--url", "--output_json")))
    lines += ["", f"- `python launch/serve.py --mesh=items:2` (default model, slot head, history 20, 20 retrieved "
                  f"candidates; the warm-up measures a returning and a new user's request) + `python launch/loadtest.py "
                  f"{argv}` ({a['date']}); the warm rows with `--num_users=50 --warm_users`. Server latency: from the "
                  "answered try's arrival to its answer (what the target bounds); client latency: from the first "
                  "try, a resent request's wait for its Retry-After included."]
    for r, how in ((d[("after", "new")], "count + cost"), (jittered or {}, "count + cost, jittered")):
        if r.get("answered_per_client"):
            lines.append(f"- Answers per client ({how}, new users): {r['answered_per_client']}.")
    for c in ("before", "after"):
        f = out / f"admission_{c}.txt"
        if f.exists():
            lines.append(f"- {c}: `{f.read_text().strip()}`")
    lines.append("")
    return lines


def _ab_section(out: Path) -> list[str]:
    """The rcllm server under ApacheBench (an independent client; its report load_ab_c*.txt as ab wrote
    it, plus the server's compile count around the run)."""
    files = sorted(out.glob("load_ab_c*.txt"))
    if not files:
        return []
    lines = ["## An independent client: ApacheBench against the rcllm server", "",
             "| command | complete | failed | non-2xx | requests/s | latency p50 | latency p99 | "
             "compiles during the run |",
             "|---|---|---|---|---|---|---|---|"]
    # ab's "Failed requests" also counts answers whose length differs from the first one's (ours carry
    # timings and request ids): a failure here is a connect, receive or exception failure only
    broken = r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)"
    for f in files:
        text = f.read_text()

        def field(pattern, default=None):
            m = re.search(pattern, text, re.M)
            return m.group(1) if m else default
        c0, c1 = field(r"compiles during ab: (\S+) ->"), field(r"compiles during ab: \S+ -> (\S+)")
        compiles = "-" if c0 is None else str(int(float(c1) - float(c0)))
        m = re.search(broken, text)
        failed = sum(map(int, m.groups())) if m else field(r"^Failed requests:\s+(\d+)")
        cells = [f"`{field(r'^command: (.*)$', 'ab')}`", field(r"^Complete requests:\s+(\d+)"),
                 failed, field(r"^Non-2xx responses:\s+(\d+)", "0"),
                 field(r"^Requests per second:\s+(\S+)"), field(r"^ +50% +(\d+)") + " ms",
                 field(r"^ +99% +(\d+)") + " ms", compiles]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines + ["", "- The same request (a returning user, 20 retrieved candidates, top 10) sent by `ab` "
                    "(apache2-utils) to the server of the rcllm row above, after its load run: a check of "
                    "`launch/loadtest.py`'s throughput by a client we did not write. Failed: connect, receive or "
                    "exception failures (ab also counts answers of another length than the first, which ours "
                    "are: they carry timings and request ids).", ""]


FLOOR_TEXT = ("the larger of the computed tokens' FLOPs at the measured matmul peak and the bytes read (cached KV "
              "rows + weights) at the measured bandwidth (`eval.floor.request_floor_s`)")


def _profile_section(out: Path) -> list[str]:
    """Step-by-step profiles of one rcllm request (launch/bench_profile.py), one column per profile_*.json."""
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("profile_*.json"))]
    if not runs:
        return []
    runs.sort(key=lambda d: d["label"] != "before")
    steps = list(runs[0]["median_ms"])
    head = [f"{d['label']} ({d['commit']}, {d['date']})" for d in runs]
    lines = ["", f"## Where rcllm's time goes (history {runs[0]['history_len']} / {runs[0]['candidates']} retrieved "
             "candidates)", "",
             "| step (median ms) | " + " | ".join(head) + " |", "|---|" + "---|" * len(runs)]
    for k in steps:
        lines.append(f"| {k} | " + " | ".join(f"{d['median_ms'].get(k, float('nan')):.1f}" for d in runs) + " |")
    lines.append("| request / floor | " + " | ".join(f"{d['median_ms']['request'] / d['median_ms']['floor']:.2f}"
                                                    for d in runs) + " |")
    lines.append("| computed tokens / recomputed rows | " + " | ".join(
        f"{d['requests'][0]['computed_tokens']} / {d['requests'][0]['recompute_rows']}" for d in runs) + " |")
    r0 = runs[0]["requests"][0]
    lines += ["", f"- `python launch/bench_profile.py --history_len={runs[0]['history_len']} "
              f"--candidates={runs[0]['candidates']} --label=L --output_json=docs/benchmarks/profile_L.json` "
              f"(a \"before\" column: the same script against the earlier checkout, its floor by today's "
              f"`request_floor_s`). {len(runs[0]['requests'])} returning test users, default model and slot head, "
              f"float32, 1 device, 2 CPU cores; compiles excluded. Shapes (first user): prefix {r0['prefix_rows']} "
              f"rows, suffix {r0['suffix_rows']}, prompt {r0['prompt_tokens']} tokens.",
              "- request: `Engine.rank` whole; inputs: stitch + fetch + device arrays; fetch: the item rows' "
              "gather + re-rotation alone; prefill: the jitted blended prefill alone; floor: " + FLOOR_TEXT + ".", ""]
    return lines


def _grid_section(out: Path) -> list[str]:
    """The TTFT grid (served model, retrieved candidates): TTFT p50 / p99 per mode, rcllm's ratios
    to every baseline, its floor, fidelity and accuracy with bootstrap intervals."""
    points = sorted(out.glob("grid_h*_c*.json"), key=lambda f: tuple(int(x[1:]) for x in f.stem.split("_")[1:]))
    if not points:
        return []
    modes = GRID_MODES.split(",") + ["hf_full"]
    data = {f.stem: json.loads(f.read_text()) for f in points}
    c0 = data[points[0].stem]["config"]
    values = lambda key: ",".join(map(str, sorted({d["config"][key] for d in data.values()})))  # noqa: E731
    lines = ["## TTFT grid: history x retrieved candidates (the served model)", "",
             f"`python launch/make_benchmarks.py --only=grid --grid_history_lens={values('history_len')} "
             f"--grid_candidates={values('num_candidates')} --grid_users={c0['num_users']}` (each point: `bench.py "
             + " ".join(a for a in c0.get("argv", []) if not a.startswith(("--output_json", "--history_len",
                                                                             "--num_candidates"))) + "`"
             f" at its history and candidate count). {c0['num_requests']} requests per point (test users, the item-kNN "
             f"retriever's top candidates in its order, score-slot head), {c0['dtype']}, {c0['cpu_cores']} CPU cores, "
             f"{c0['devices']} device; compiles excluded. rcllm's floor: " + FLOOR_TEXT + ". Accuracy over so few "
             "requests is noise (intervals shown); the accuracy figures are the 943-user runs above.", "",
             "| history | candidates | run on | prompt p50 | " + " | ".join(f"{m} p50 / p99" for m in modes)
             + " | rcllm vs prefix_warm | vs prefix | vs full | vs hf_full | rcllm computed tok | rcllm / floor "
             "| rcllm top-1 | rcllm KL | NDCG@10 within: full / rcllm [95% CI] |",
             "|" + "---|" * (len(modes) + 13)]
    for d in data.values():
        c, rows = d["config"], _rows(d)
        t = {m: rows[m]["ttft_p50_s"] for m in modes if m in rows}
        rc = rows.get("rcllm", {})
        ratio = lambda m: f"{t[m] / t['rcllm']:.1f}x" if m in t and "rcllm" in t else "-"  # noqa: E731
        ci = rc.get("ndcg@10_retrieved_ci") or [None, None]
        lines.append(f"| {c['history_len']} | {c['num_candidates']} | {c.get('date', 'undated (earlier code)')} | "
                     f"{c['prompt_tokens']['p50']:.0f} | "
                     + " | ".join(f"{_fmt(rows[m]['ttft_p50_s'])} / {_fmt(rows[m]['ttft_p99_s'])} s" if m in rows
                                  else "-" for m in modes)
                     + f" | {ratio('prefix_warm')} | {ratio('prefix')} | {ratio('full')} | {ratio('hf_full')} | "
                     f"{_fmt(rc.get('computed_tokens_p50'), '.0f')} | {_fmt(rc.get('ttft_over_floor'), '.1f')} | "
                     f"{_fmt(rc.get('top1_agreement'))} | {_fmt(rc.get('kl_mean'), '.4f')} | "
                     f"{_fmt(rows.get('full', {}).get('ndcg@10_retrieved'))} / {_fmt(rc.get('ndcg@10_retrieved'))} "
                     f"[{_fmt(ci[0])}, {_fmt(ci[1])}] |")
    if "grid_h50_c50" in data:
        rows = _rows(data["grid_h50_c50"])
        t = {m: r["ttft_p50_s"] for m, r in rows.items() if r.get("ttft_p50_s")}
        lines.append("")
        for peer, want in (("prefix_warm", 5), ("prefix", 10), ("hf_full", 20)):
            if peer in t and "rcllm" in t:
                x = t[peer] / t["rcllm"]
                lines.append(f"- history 50 / 50 candidates: rcllm vs {peer} **{x:.1f}x** lower TTFT p50 (target >= "
                             f"{want}x: {'met' if x >= want else 'not met'})")
        pol = rows.get("rcllm", {}).get("policy")
        canon = _canonical(data["grid_h50_c50"]["config"])
        if pol and not _is_default(pol, canon):
            lines.append(f"- the grid's rcllm rows ran with an earlier rcllm default ({_policy_text(pol, canon)}); "
                         f"today's ({_default_text()}) is timed in the served TTFT run above")
        fl = rows.get("rcllm", {}).get("ttft_over_floor")
        if fl is not None:
            lines.append(f"- rcllm TTFT / floor {fl:.1f} (target <= 3: {'met' if fl <= 3 else 'not met'})")
    return lines + [""]


def _fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def _bench_section(name, path: Path, report_dir: Path, top1: float) -> list[str]:
    d = json.loads(path.read_text())
    c, rows = d["config"], _rows(d)
    lines = [f"### {name}: {Path(c['model']).name}", "",
             f"Command: `python launch/bench.py {' '.join(c.get('argv', []))}`" if c.get("argv") else "",
             f"{c['dataset']}, {c['num_requests']} requests ({c['num_users']} users x {c['requests_per_user']}), "
             f"{c['num_candidates']} {c['negatives']} candidates, history {c['history_len']}, prompt p50 "
             f"{c['prompt_tokens']['p50']:.0f} tokens, {c['dtype']}, {c['cpu_cores']} CPU cores, {c['devices']} device(s); "
             f"measured f32 matmul peak {c['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, read bandwidth "
             f"{c['memory_bandwidth_bytes_s'] / 1e9:.0f} GB/s; transformers peer: {c.get('peers', {}).get('transformers')}.",
             "", "| mode | TTFT p50 | TTFT p99 | computed tok p50 | recomputed | top-1 agr. | KL | HR@10 | NDCG@10 | "
             "GFLOP p50 | KV MB read p50 | TTFT / floor | % of peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        if r.get("ttft_p50_s") is None:
            lines.append(f"| {m} | | | | | | | {r['hr@10']:.3f} | {r['ndcg@10']:.3f} | | | | |")
            continue
        pol = r.get("policy")
        if m == "rcllm" and pol and not _is_default(pol, _canonical(c), ignore_glue=True):
            m = f"rcllm ({_policy_text(pol, _canonical(c))}: an earlier default)"
        lines.append(f"| {m} | {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | {_fmt(r.get('computed_tokens_p50'), '.0f')} | "
                     f"{_fmt(r.get('recompute_fraction'))} | {_fmt(r.get('top1_agreement'))} | {_fmt(r.get('kl_mean'), '.4f')} | "
                     f"{r['hr@10']:.3f} | {r['ndcg@10']:.3f} | {_fmt(r.get('flops_p50', 0) / 1e9, '.2f')} | "
                     f"{_fmt(r.get('kv_bytes_read_p50', 0) / 1e6, '.1f')} | {_fmt(r.get('ttft_over_floor'), '.1f')} | "
                     f"{_fmt(100 * r['achieved_flops_fraction'] if r.get('achieved_flops_fraction') is not None else None, '.1f')} |")
    lines.append("")
    if "rcllm" in rows:
        rc = rows["rcllm"]["ttft_p50_s"]
        checks = []
        for peer, want in (("prefix", 10), ("full", 20), ("hf_full", 20)):
            if peer in rows and rows[peer].get("ttft_p50_s"):
                x = rows[peer]["ttft_p50_s"] / rc
                checks.append(f"rcllm vs {peer}: **{x:.1f}x** lower TTFT p50 (target >= {want}x: "
                              f"{'met' if x >= want else 'not met'})")
        agr = rows["rcllm"].get("top1_agreement")
        checks.append(f"rcllm top-1 agreement {agr:.3f} (target >= 0.99: {'met' if agr >= 0.99 else 'not met'})")
        mode, frac = needed_budget(d["results"], top1)
        checks.append(f"cheapest block row keeping top-1 >= {top1}: "
                      + ("none" if mode is None else f"{mode} at recompute fraction {frac:.3f}"))
        fl = rows["rcllm"].get("ttft_over_floor")
        checks.append(f"rcllm TTFT / floor {fl:.1f} (target <= 2: {'met' if fl <= 2 else 'not met'})")
        lines += [f"- {x}" for x in checks] + [""]
    lines += _plot_links(path, c.get("plots", []), report_dir)
    return lines + [""]


def _plot_links(json_path: Path, plots, report_dir: Path) -> list[str]:
    """Markdown images for the plots written beside `json_path` (wherever that directory now is)."""
    here = json_path.parent
    return [f"![{Path(p).stem}]({os.path.relpath(here / Path(p).parent.name / Path(p).name, report_dir)})"
            for p in plots]


def render(out: Path, report: Path, top1: float = 0.99) -> str:
    """BENCHMARKS.md's text from the JSON files under `out` (plot links relative to `report`'s
    directory; top1: the agreement the cheapest sufficient recompute budget must keep)."""
    report_dir = report.parent
    lines = ["# BENCHMARKS", "", "Regenerate everything: `python launch/make_benchmarks.py "
             "[--tuned_model=runs/block/merged]` (`--norun` rewrites this file from the JSON in "
             f"`{_display(out)}`). Every figure below is read from those files: the current figures first, "
             "earlier prompt formats and placements in the appendix.", "",
             ]
    lines += _glance_section(out)
    lines += _ranker_section(out)
    lines += _slices_section(out)
    lines += _served_section(out, report_dir)
    lines += _grid_section(out)
    lines += _profile_section(out)
    lines += _load_section(out)
    lines += _load_modes_section(out)
    lines += _ab_section(out)
    lines += _state_section(out)
    lines += _shutdown_save_section(out / "shutdown_save.json")
    lines += _coaccess_section(out)
    for name in SCALING_RUNS:
        lines += _scaling_section(out / f"{name}.json", report_dir)
    lines += _kv_section(out / "kv_dtype.json")
    lines += _build_section(out / "build.json")
    lines += _retrieval_section(out / "retrieval.json")
    lines += _update_section(out / "update.json")
    lines += _reload_section(out / "reload.json")
    lines += _serving_section(out / "serving.json")
    lines += _scaling_model_section(out / "scaling_model.json")
    lines += _memory_plan_section(out / "memory_plan.json")
    lines += ["## Appendix: earlier prompt formats and placements", "",
              "Runs kept for comparison; the figures above supersede them.", "",
              "## TTFT and fidelity per mode (label prompts, sampled candidates)", ""]
    for name, f in (("zero-shot", "zeroshot.json"), ("tuned block-aware", "tuned.json")):
        if (out / f).exists():
            lines += _bench_section(name, out / f, report_dir, top1)
        else:
            lines += [f"### {name}", "", f"not measured in this report (`{out / f}` absent)", ""]
    lines += ["## Sharded item store: placement on a 4-shard mesh (retrieval candidates)", "",
              "| placement | rcllm TTFT p50 | local fraction | remote blocks / request | remote MB / request |",
              "|---|---|---|---|---|"]
    for p in ("similarity", "hash"):
        f = out / f"mesh_{p}.json"
        if f.exists():
            r = next(x for x in json.loads(f.read_text())["results"] if x["mode"] == "rcllm")
            lines.append(f"| {p} | {r['ttft_p50_s']:.3f} s | {r['local_fraction']:.3f} | "
                         f"{r['remote_blocks_per_request']:.2f} | {r['remote_bytes_per_request'] / 1e6:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _glance_section(out: Path) -> list[str]:
    """The headline figures, each read from the run its section below reports in full."""
    lines = []
    sweep, grid = out / "served_sweep.json", out / "grid_h50_c50.json"
    if sweep.exists():
        d = json.loads(sweep.read_text())
        rows = _rows(d)
        _, rc = _served_default(out, d)
        if rc and "full" in rows and "retriever" in rows:
            lines.append(f"- Ranking ({d['config']['num_requests']} ML-100k test users, {d['config']['num_candidates']} "
                         f"retrieved candidates, history {d['config']['history_len']}): NDCG@10 within the retrieved "
                         f"rcllm {rc['ndcg@10_retrieved']:.3f}, full prefill {rows['full']['ndcg@10_retrieved']:.3f}, "
                         f"the retriever's own order {rows['retriever']['ndcg@10_retrieved']:.3f}"
                         + (f", the collaborative features alone (no LLM) {rows['collaborative']['ndcg@10_retrieved']:.3f}"
                            if "collaborative" in rows else "") + "; rcllm agrees with "
                         f"full prefill on the top candidate for {100 * rc['top1_agreement']:.1f}% of requests "
                         "(\"The served model\").")
    if grid.exists():
        d = json.loads(grid.read_text())
        t = {r["mode"]: r["ttft_p50_s"] for r in d["results"] if r.get("ttft_p50_s")}
        c = d["config"]
        if {"rcllm", "prefix", "prefix_warm", "full"} <= set(t):
            lines.append(f"- TTFT p50 at history {c['history_len']} / {c['num_candidates']} retrieved candidates "
                         f"({c['prompt_tokens']['p50']:.0f}-token prompts, {c['dtype']}, {c['cpu_cores']} CPU cores, "
                         f"{c['devices']} device, {c['date']}): rcllm {1e3 * t['rcllm']:.0f} ms; "
                         f"**{t['prefix_warm'] / t['rcllm']:.1f}x** sooner than a warmed prefix cache, "
                         f"**{t['prefix'] / t['rcllm']:.1f}x** than prefix caching, {t['full'] / t['rcllm']:.1f}x than "
                         "full prefill (\"TTFT grid\").")
    runs = {f.stem[len("load_mode_"):]: json.loads(f.read_text()) for f in sorted(out.glob("load_mode_*.json"))}
    if {"rcllm_serial", "prefix_warm"} <= set(runs):
        a, b = runs["rcllm_serial"], runs["prefix_warm"]
        lines.append(f"- Served under load (8 clients, `serve.py --mesh=items:2`): rcllm {a['throughput_rps']:.2f} "
                     f"requests/s at latency p99 {a['latency_p99_s']:.2f} s, prefix_warm {b['throughput_rps']:.2f} at "
                     f"{b['latency_p99_s']:.2f} s (\"Throughput under load per mode\").")
    return (["## At a glance", ""] + lines + [""]) if lines else []


def _scaling_section(f: Path, report_dir: Path) -> list[str]:
    """One bench_scaling.py run: the target ratios and every row."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    lines = []
    c = d["config"]
    cands = (f"the item-kNN retriever's top-{c['num_candidates']}" if c.get("candidates", "sampled") == "retrieved"
             else f"{c['num_candidates']} {c['negatives']} candidates")
    lines += [f"## Scaling: {SCALING_RUNS[f.stem][0]}", "",
              f"`launch/bench_scaling.py`. Model: {c['model']}; {c['num_requests']} requests (test users), "
              f"{cands}; {c['cpu_cores']} CPU cores simulating the devices (times are not a scaling "
              "measurement here; bytes are). Replication r: up to r x a shard's mean item tokens held on "
              "every shard (`max shard / mean`: the largest shard's item tokens, replicas included, over "
              "the catalog's mean per shard).", ""]
    for t in c.get("remote_ratios", []):
        lines.append(f"- x{t['catalog_scale']}, {t['devices']} devices: {t['best']} reads "
                     f"{t['best_remote_bytes'] / 1e3:.1f} KB remote per request (local fraction "
                     f"{t['best_local_fraction']:.3f}, load max/mean {t['best_max_over_mean_load']:.3f}): "
                     f"hash + round-robin reads {_fmt(t['hash_round_robin_ratio'], '.1f')}x more, hash + "
                     f"affinity {_fmt(t['hash_affinity_ratio'], '.1f')}x more.")
    base = {(r["devices"], r["placement"], r.get("replicate", 0), r["scheduler"], r.get("fetch")): r["ttft_p50_s"]
            for r in d["results"] if r["catalog_scale"] == 1}
    for r in d["results"]:
        key = (r["devices"], r["placement"], r.get("replicate", 0), r["scheduler"], r.get("fetch"))
        if r["catalog_scale"] == 100 and key in base:
            lines.append(f"- TTFT p50 x100 / x1, {r['devices']} devices, {r['placement']} + {r.get('replicate', 0):g}, "
                         f"{r['scheduler']}: {r['ttft_p50_s'] / base[key]:.2f}x (target <= 1.2x).")
    lines += ([""] if c.get("remote_ratios") or any(r["catalog_scale"] == 100 for r in d["results"]) else []) + [
              "| catalog | items | devices | placement | r | scheduler | TTFT p50 | local fraction | "
              "remote blocks / req | remote KB / req | load max/mean | max shard / mean |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        fetch = " (collective fetch)" if r.get("fetch") == "collective" else ""
        lines.append(f"| x{r['catalog_scale']} | {r['catalog_items']} | {r['devices']} | {r['placement']}{fetch} | "
                     f"{r.get('replicate', 0):g} | {r['scheduler']} | {r['ttft_p50_s'] * 1e3:.1f} ms | "
                     f"{r['local_fraction']:.3f} | {r['remote_blocks_per_request']:.2f} | "
                     f"{r['remote_bytes_per_request'] / 1e3:.1f} | {r['max_over_mean_load']:.3f} | "
                     f"{_fmt(r.get('max_shard_tokens_over_mean'), '.3f')} |")
    lines.append("")
    lines += _plot_links(f, d["config"].get("plots", []), report_dir) + [""]
    return lines


def _kv_section(f: Path) -> list[str]:
    """launch/bench_kv.py: each cache dtype's fidelity to the f32 cache, bytes and memory."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, ref = d["config"], d["config"]["reference"]
    m = c["memory_statement"]
    gb = f"x{m['catalog_scale']}_catalog_gb_per_shard"
    lines = ["## Compact cached KV (`launch/bench_kv.py`)", "",
             f"The served ranking ({c['mode']}, slot head + collaborative features) of {c['num_requests']} test "
             f"requests whose target was retrieved ({c['num_candidates']} candidates, history {c['history_len']}), "
             f"from a cache of each dtype against the same from the {ref} cache, one run. Memory: the item cache of "
             f"a x{m['catalog_scale']} catalog ({c['catalog_tokens']} tokens x {m['catalog_scale']}) on "
             f"{m['shards']} shards with +{m['replicate']:g} replication. TTFT on {c['cpu_cores']} CPU cores.", "",
             f"| KV dtype | bytes / token | top-1 vs {ref} | KL vs {ref} | Kendall tau | NDCG@10 (retrieved) | "
             f"minus {ref} [95% CI] | TTFT p50 | GB per shard |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        lo, hi = r["ndcg@10_minus_reference_ci"]
        lines.append(f"| {r['kv_dtype']} | {r['bytes_per_token']} | {r[f'top1_agreement_vs_{ref}']:.3f} | "
                     f"{r[f'kl_mean_vs_{ref}']:.2e} | {r[f'kendall_tau_vs_{ref}']:.3f} | "
                     f"{r['ndcg@10_retrieved']:.4f} | {r['ndcg@10_minus_reference']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                     f"{r['ttft_p50_s'] * 1e3:.0f} ms | {r[gb]:.2f} |")
    return lines + [""]


def _build_section(f: Path) -> list[str]:
    """launch/bench_build.py: item-cache build throughput against full-prefill throughput."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, p, one = d["config"], d["prefill"], d.get("prefill_one_device")
    ref = d["prefill_reference_tokens_per_s"]
    lines = ["## Item-cache build throughput (`launch/bench_build.py`)", "",
             f"{c['model']} ({c['dtype']}), cache {c['kv_dtype']}, {c['placement']} placement + {c['replicate']:g} "
             f"replication on {c['devices']} simulated items-shards; passes of {c['rows']} packed row(s) of "
             f"{c['row_tokens']} tokens per shard, one SPMD program per pass. Reference: full prefill of "
             f"{p['prompt_tokens_p50']:.0f}-token prompts, {p['tokens_per_s']:.0f} tokens/s in the same process"
             + (f", {one['tokens_per_s']:.0f} tokens/s on one unsimulated device" if one else "")
             + f" (the target compares with {ref:.0f}). Target: build within 2x of it, flat over the build.", "",
             "| catalog | items | blocks | tokens | wall | encode | first passes (compile) | lay-out | tokens/s | "
             "steady tokens/s | prefill / build | slots used | last / first quarter |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| x{r['catalog_scale']} | {r['catalog_items']} | {r['blocks']} | {r['encoded_tokens']} | "
                     f"{r['wall_s']:.0f} s | {r['encode_s']:.0f} s | {r['first_passes_s']:.0f} s | "
                     f"{r['layout_s']:.0f} s | {r['tokens_per_s']:.0f} | {r['steady_tokens_per_s']:.0f} | "
                     f"{r['prefill_over_build']:.2f}x | {r['slot_utilisation']:.3f} | {r['flatness']:.3f} |")
    return lines + [""]


def _retrieval_section(f: Path) -> list[str]:
    """launch/bench_retrieval.py: recall on the cold-start slices; the retriever on the LlamaRec protocol."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, cs, lr = d["config"], d["cold_slices"], d["llamarec"]
    k, names = c["num_candidates"], list(cs["slices"])
    cold = cs["cold"]
    lines = ["## Retrieval on the cold-start slices (`launch/bench_retrieval.py`)", "",
             f"ML-100k, test positions {c['test_positions']} (retrievers fitted strictly before each), top "
             f"{k} retrieved. Slices (`data/slices.py`, chosen before any fit): new items = the latest "
             f"{c['new_item_fraction']:.0%} by first interaction ({cold['new_items']} items, their interactions "
             f"removed from every fit); new users = {cold['new_users']} seeded users left out of every fit, predicting "
             f"item h + 1 from their first h (h = 1..{cold['new_user_history']}); few / very few = targets with <= "
             f"{cold['few']} / <= {cold['very_few']} fitted interactions; warm = the rest. Recall@{k} (95% "
             "bootstrap interval over users in the JSON); the blended retriever is kNN plus the content path "
             "(`retrieval.py`: TF-IDF of the item texts; cold items get up to cold_share x K slots, as many as "
             "the share of cold items in the user's recent history asks for).", "",
             "| retriever | " + " | ".join(f"{n} ({cs['slices'][n]['requests']})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for row in cs["slices"]["all"]["rows"]:
        lines.append(f"| {row} | " + " | ".join(f"{cs['slices'][n]['rows'][row][f'recall@{k}']:.3f}"
                                               for n in names) + " |")
    lines += ["", f"**The LlamaRec protocol, the retriever alone** ({lr['users']} users and {lr['items']} items "
              f"with >= 5 interactions, the last item the target, fitted on every item but the last two, its top "
              f"{lr['retrieved']} for the history before the target, a target not retrieved = a miss; intervals "
              "95% bootstrap). LlamaRec's figures are its paper's (Table 2, ML-100k): its retriever LRURec ranks the "
              "full catalog, LlamaRec reranks LRURec's top 20. The served ranker on this protocol: section "
              "'What the LLM adds, slice by slice' above.", "",
              "| model | NDCG@10 | Recall@10 | source |", "|---|---|---|---|"]
    for name, r in lr["rows"].items():
        lines.append(f"| {name} | {r['ndcg@10']:.4f} [{r['ndcg@10_ci'][0]:.4f}, {r['ndcg@10_ci'][1]:.4f}] | "
                     f"{r['recall@10']:.4f} [{r['recall@10_ci'][0]:.4f}, {r['recall@10_ci'][1]:.4f}] | measured |")
    for name, r in lr["published"].items():
        lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | published |")
    return lines + [""]


def _update_section(f: Path) -> list[str]:
    """launch/bench_update.py: an incremental catalog update against a full build."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, full, up, fl = d["config"], d["full"], d["update"], d["floor"]
    lines = ["## Incremental catalog update (`launch/bench_update.py`)", "",
             f"{Path(c['model']).name.split('.')[0]}, ML-100k x{c['catalog_scale']} ({c['items_before']} items), "
             f"{c['kv_dtype']} cache on "
             f"{c['devices']} simulated items-shards. {c['changed']:.0%} of the items changed ({c['retitled']} "
             f"retitled, {c['removed']} removed, {c['new']} new). Full: every block encoded, placed, saved "
             "(`build_cache.py`). Update: the step restored, only the changed blocks encoded and placed, a new "
             "step saved (`build_cache.py --update`). Same process, one after the other. (x10, the issue's size: "
             "saving its full build was killed for memory on this 24 GiB machine, WORKSPACE_NOTES.)", "",
             "| path | total | encode | lay-out | restore | save | tokens encoded | blocks encoded / dropped / "
             "kept / moved |", "|---|---|---|---|---|---|---|---|",
             f"| full build | {full['total_s']:.1f} s | {full['encode_s']:.1f} s | {full['layout_s']:.1f} s | - | "
             f"{full['save_s']:.1f} s | {full['encoded_tokens']} | {full['item_blocks']} items |",
             f"| update | {up['total_s']:.1f} s | {up['encode_s']:.1f} s | {up['layout_s']:.1f} s | "
             f"{up['restore_s']:.1f} s | {up['save_s']:.1f} s | {up['encoded_tokens']} | {up['added']} / "
             f"{up['dropped']} / {up['kept']} / {up['moved']} |", "",
             f"The update takes {d['speedup']:.1f}x less time than the full build (target >= "
             f"{d['target_speedup']:.0f}x: {'met' if d['meets_target'] else 'not met'}). Its floor here: "
             f"{fl['encode_changed_s']:.1f} s to encode the changed tokens at the full build's rate + "
             f"{fl['rewrite_step_s']:.1f} s to read and write the whole {full['snapshot_bytes'] / 1e9:.2f} GB step "
             f"once ({fl['speedup_at_floor']:.1f}x at that floor); a step format that shares unchanged shards "
             f"with the previous step would leave the encode alone ({fl['speedup_without_rewrite']:.0f}x).", ""]
    return lines


def _reload_section(f: Path) -> list[str]:
    """launch/bench_reload.py: a live server taking an updated step under load."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, u, r, lt = d["config"], d["update"], d["reload"], d["loadtest"]
    return ["### A live server taking the update under load (`launch/bench_reload.py`)", "",
            f"ML-100k as a catalog directory served on {c['mesh']} (default model); {c['retitled']} items retitled "
            f"and {c['new']} added, `build_cache.py --update` ({u['update']['added']} blocks encoded, "
            f"{u['update']['dropped']} dropped, {u['update']['moved']} moved, {u['total_s']:.1f} s), then "
            f"`loadtest.py` ({c['clients']} clients, {c['duration_s']:.0f} s) with POST /admin/reload sent "
            f"{c['reload_at_s']:.0f} s after its first answer: step {r['step']} staged in {r['staged_s']:.1f} s beside "
            f"the served one, then queued behind the requests ahead of it and swapped in by the engine loop "
            f"{r['swap_s']:.1f} s later ({r['answered_during']} requests answered while the reload ran, "
            f"{r['answered_before']} before). The load test: {lt['sent']} requests sent, {lt['answered_200']} "
            f"answered 200 (statuses {lt['status_counts']}), {lt['lost']} lost, {lt['answered_twice']} answered "
            f"twice: {'no request failed across the switch' if d['no_request_failed'] else 'requests FAILED'}. "
            f"Processes shared this machine's two cores and the server started without warm-up "
            f"({lt['compiles_during_run']} compiles during the run): a correctness run, not a timing.", ""]


def _serving_section(f: Path) -> list[str]:
    """launch/bench_serving.py: batched serving steps against the one-at-a-time loop under load."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c, a = d["config"], d["agreement"]
    lines = ["## Serving under load: batched steps vs one request at a time (`launch/bench_serving.py`)", "",
             f"The served recommender ({c['model']}, {c['head']} head, {c['mode']}, {c['placement']} + "
             f"{c['replicate']:g} replication, {c['kv_dtype']} cache) on {c['mesh']}, {c['devices']} simulated "
             f"devices on this machine's CPU cores; the in-process service (scheduler + engine loop, no HTTP) "
             f"given {c['num_requests']} requests at once (retrieved top-{c['num_candidates']}, history "
             f"{c['history_len']}, cached history prefixes), median of {c['repeats']} bursts per loop, "
             f"alternating. batched: windows of {c['window']} as serving steps of up to {c['max_batch']} "
             "requests per shard, every shard in one program; serial: one request at a time. Latency "
             "counts from the burst's start (queueing included).", "",
             "| loop | requests/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 | compiles (timed) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in d["loops"].items():
        lines.append(f"| {name} | {r['requests_per_s']:.2f} | {r['latency_s']['p50']:.2f} s | "
                     f"{r['latency_s']['p99']:.2f} s | {r['ttft_s']['p50']:.3f} s | {r['ttft_s']['p99']:.3f} s | "
                     f"{r['compiles_timed']} |")
    lines += ["", f"batched / serial: {d['speedup']:.2f}x requests/s; the two loops' rankings identical for "
              f"{a['identical_rankings']:.3f} of the requests, scores within {a['max_abs_score_diff']:.1e}.", ""]
    return lines


def _scaling_model_section(f: Path) -> list[str]:
    """launch/scaling_model.py: requests/s per device count on paper, checked on this machine."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c = d["config"]
    links = ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in c["links"].items())
    lines = ["## Throughput per device count, on paper (`launch/scaling_model.py`)", "",
             "`rcllm_jax/eval/scaling.py`: a request costs host time h (the engine loop: validation, retrieval, "
             "prompt, layout, scores; one thread), device time c (its share of a serving step) and its remote "
             "rows' transfer b / link. N real devices serving concurrently: requests/s = 1 / max(h, (c + b/link) / "
             "N). Simulated devices on one CPU share its cores: 1 / (h + c + b / host memory bandwidth). "
             f"Calibrated on the one-device batched run ({c['model']}): h = {c['host_s_per_request'] * 1e3:.1f} ms, "
             f"c = {c['device_s_per_request'] * 1e3:.1f} ms per request; host memory bandwidth "
             f"{c['host_memory_bandwidth'] / 1e9:.1f} GB/s (measured), links {links} (stated).", "",
             "Not modelled: a serving step pads every shard's batch to the largest one (free on real devices, "
             "which run at once; real work when simulated devices share the cores) and the thread pools of "
             "several simulated devices contending for the same cores.", "",
             "| simulated devices (this machine) | measured requests/s | predicted | measured / predicted | "
             "remote KB / request |", "|---|---|---|---|---|"]
    for r in d["this_machine"]:
        cal = " (calibration)" if r["devices"] == 1 else ""
        lines.append(f"| {r['devices']}{cal} | {r['measured_requests_per_s']:.2f} | "
                     f"{r['predicted_requests_per_s']:.2f} | "
                     f"{r['measured_over_predicted']:.2f} | {r['remote_bytes_per_request'] / 1e3:.0f} |")
    keys = list(c["links"])
    lines += ["", "| real devices (each as fast as this CPU) | remote KB / request | "
              + " | ".join(f"requests/s over {k}" for k in keys) + " | bound |",
              "|---|---|" + "---|" * len(keys) + "---|"]
    for r in d["real_devices"]:
        lines.append(f"| {r['devices']} | {r['remote_bytes_per_request'] / 1e3:.0f} ({r['remote_bytes_from']}) | "
                     + " | ".join(f"{r[f'requests_per_s_{k}']:.2f}" for k in keys)
                     + f" | {'host' if r['host_bound'] else 'devices'} |")
    return lines + [""]


def _memory_plan_section(f: Path) -> list[str]:
    """launch/memory_plan.py: bytes per device of 8B-class models on items x model meshes."""
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    c = d["config"]
    lines = ["## Memory per device of 8B-class models (`launch/memory_plan.py`)", "",
             f"On paper (`eval/scaling.py`), nothing allocated: {c['weight_dtype']} weights (query/output heads, MLP "
             f"and vocabulary split over `model`, KV projections by KV head), the item cache of a "
             f"x{c['catalog_scale']} ML-100k catalog ({c['catalog_tokens']} item tokens, +{c['replicate']:g} hot-item "
             f"replication) over `items` and its KV heads over `model`, and the user store of {c['users']} users at "
             f"history {c['history_len']} ({c['user_tokens_mean']:.0f} prefix tokens each) on every items-shard. "
             f"Token counts by {c['tokenizer']} tokenizer. 'Fits': within {c['headroom']:g} of the device's memory "
             "(activations and the runtime's reserve not counted). The engine serves such meshes "
             "(`--mesh=items:N,model:M`; tested on CPU at Llama-3-8B's shapes), but none of these devices has run it "
             "yet.", "",
             "| model | KV dtype | mesh | weights GB | item cache GB | user store GB | total GB / device | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["meshes"]:
        lines.append(f"| {r['preset']} | {r['kv_dtype']} | {r['mesh']} | {r['weights_gb']:.1f} | "
                     f"{r['item_cache_gb']:.1f} | {r['user_store_gb']:.1f} | {r['total_gb']:.1f} | "
                     f"{', '.join(r['fits']) or '-'} |")
    devices = list(c["device_gb"])
    lines += ["", "Smallest mesh that fits (fewest devices, then the smallest `model`):", "",
              "| model | KV dtype | " + " | ".join(f"{k} ({c['device_gb'][k]:g} GB)" for k in devices) + " |",
              "|---|---|" + "---|" * len(devices)]
    by = {(x["preset"], x["kv_dtype"], x["device"]): x["mesh"] or "none" for x in d["smallest_mesh"]}
    for preset, kv in dict.fromkeys((x["preset"], x["kv_dtype"]) for x in d["smallest_mesh"]):
        lines.append(f"| {preset} | {kv} | " + " | ".join(by[preset, kv, k] for k in devices) + " |")
    return lines + [""]


def suite_jobs(out: Path, sizes: SuiteSizes) -> dict[str, tuple[str, list[str]]]:
    """Every run of the suite: name -> (launcher script under launch/, its flags), in run order."""
    jobs = {name: ("bench.py", args) for name, args in _bench_runs(out, sizes).items()}
    jobs["kv_dtype"] = ("bench_kv.py", [f"--output_json={out / 'kv_dtype.json'}"])
    jobs["build"] = ("bench_build.py", [f"--output_json={out / 'build.json'}"])
    jobs["retrieval"] = ("bench_retrieval.py", [f"--output_json={out / 'retrieval.json'}"])
    jobs["update"] = ("bench_update.py", [f"--output_json={out / 'update.json'}"])
    jobs["reload"] = ("bench_reload.py", [f"--output_json={out / 'reload.json'}"])
    for name, (_, args) in SCALING_RUNS.items():
        jobs[name] = ("bench_scaling.py", [*args(sizes), f"--output_json={out / f'{name}.json'}"])
    jobs["serving"] = ("bench_serving.py", ["--mesh=items:4", f"--output_json={out / 'serving.json'}"])
    for n in (1, 2):
        jobs[f"serving items:{n}"] = ("bench_serving.py", [f"--mesh=items:{n}", "--loops=batched",
                                                            f"--output_json={out / f'serving_items{n}.json'}"])
    jobs["serving scaling model"] = ("scaling_model.py", [
        f"--runs={out / 'serving_items1.json'},{out / 'serving_items2.json'},{out / 'serving.json'}",
        f"--locality_json={out / 'scaling_retrieved.json'}", f"--output_json={out / 'scaling_model.json'}"])
    jobs["memory plan"] = ("memory_plan.py", [f"--output_json={out / 'memory_plan.json'}"])
    return jobs
