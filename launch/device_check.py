"""The one-call device check: on whatever accelerator this machine has, compile the Pallas kernels,
check them compiled against their references, and time the served path's modes. One JSON, a short
table, a verdict.

  python launch/device_check.py --output_json=device_check.json          (default model and data)
  python launch/device_check.py --export_assets=.devassets               (here, once: what a machine
      that cannot fetch needs: the default model's config + tokenizer, no weights, and ml-100k)
  python launch/device_check.py --assets=.devassets --output_json=$OUT/device_check.json   (there)

Steps, each recorded with its wall time and outcome (all under --budget_s, 8 minutes by default):
  lower    every kernel variant lowered for its platform (Triton IR, Mosaic; what the CPU tests
           check), so a failure below is the compiler's or the numbers', not a missing lowering
  kernels  the kernel tests of this backend's variant, compiled (`tests/kernel_variants.py`:
           RCLLM_KERNELS_COMPILED=1, `pytest -k <backend>`): every variant test against the
           pure-JAX references with NaN-poisoned rows. On CPU there is no compiled variant: skipped
  timing   bench.py at --history_len / --num_candidates (50 / 50): full, prefix_warm and rcllm
           through the XLA path, and on GPU/TPU rcllm through the Pallas kernels (--compare_impl),
           the same requests; TTFT p50 of each and the ratios (prefix_warm / rcllm is the target's)
Verdict: the kernels are verified on this backend when every compiled test passed; then add the
backend to `rcllm_jax.kernels.VERIFIED_BACKENDS` (so `--attention_impl=auto` picks them there).
With --assets (random weights: TTFT does not depend on the weights' values) the timing runs the
label head on sampled candidates; with the real model, the served configuration (slot head,
retrieved candidates). The device machines lent to this project hold jax, pytest, absl, sklearn,
pyarrow and tokenizers but not grain, gguf or pymetis: carry their wheels (docs/launchers.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("output_json", "device_check.json", "Where to write the JSON.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget of all steps (seconds).")
_ASSETS = flags.DEFINE_string("assets", None, "A --export_assets folder: time the default model's shapes with "
                              "random weights on its data (a machine that cannot fetch).")
_EXPORT = flags.DEFINE_string("export_assets", None, "Write the assets folder for --assets here, then exit.")
_HIST = flags.DEFINE_integer("history_len", 50, "History items per prompt of the timing step.")
_CANDS = flags.DEFINE_integer("num_candidates", 50, "Candidates per request of the timing step.")
_USERS = flags.DEFINE_integer("num_users", 20, "Requests timed per mode.")
_CALIB = flags.DEFINE_integer("calibration_requests", 16, "Requests rcllm's policy is calibrated on.")
_STEPS = flags.DEFINE_list("steps", ["lower", "kernels", "timing"], "Steps to run.")

KERNEL_TESTS = ["tests/test_pallas_kernels.py", "tests/test_paged_attention.py"]


def export_assets(folder: Path) -> None:
    """The default model's config and tokenizer (no weights) and the ml-100k files, for --assets."""
    from rcllm_jax.downloads import ML_100K, download
    from rcllm_jax.model import load_model
    from rcllm_jax.model.export import save_hf_meta
    lm = load_model(with_tokenizer=True)
    save_hf_meta(folder / "model", lm.cfg, lm.tokenizer)
    data = folder / "ml-100k"
    shutil.copytree(download(ML_100K), data, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".verified"))
    print(f"wrote {folder}: model/ (config + tokenizer of {Path(lm.source).name}), ml-100k/")


def _run(cmd: list[str], budget_s: float, env: dict | None = None) -> dict:
    """A subprocess under the remaining budget -> {rc, wall_s, tail}."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, budget_s),
                           env={**os.environ, **(env or {})})
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        got = e.stdout or ""
        rc, out = "timeout", got.decode(errors="replace") if isinstance(got, bytes) else got
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "tail": out[-3000:]}


def _pytest_counts(junit: Path) -> dict:
    import xml.etree.ElementTree as ET
    if not junit.exists():
        return {}
    s = ET.parse(junit).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    return {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main(argv):
    del argv
    if _EXPORT.value:
        export_assets(Path(_EXPORT.value))
        return
    import jax
    backend = jax.default_backend()
    dev = jax.devices()[0]
    t_end = time.perf_counter() + _BUDGET.value
    left = lambda: t_end - time.perf_counter()  # noqa: E731
    report = {"backend": backend, "device": getattr(dev, "device_kind", str(dev)), "devices": jax.device_count(),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "steps": {}}
    tmp = Path(tempfile.mkdtemp(prefix="device_check."))
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if "lower" in _STEPS.value:
        junit = tmp / "lower.xml"
        r = _run(py + KERNEL_TESTS + ["-k", "lowers", f"--junitxml={junit}"], left())
        report["steps"]["lower"] = {**r, **_pytest_counts(junit)}
    if "kernels" in _STEPS.value:
        if backend in ("gpu", "tpu"):
            junit = tmp / "kernels.xml"
            r = _run(py + KERNEL_TESTS + ["-k", f"{backend} and not lowers and not engine", f"--junitxml={junit}"],
                     left(), env={"RCLLM_KERNELS_COMPILED": "1"})
            report["steps"]["kernels"] = {**r, **_pytest_counts(junit)}
        else:
            report["steps"]["kernels"] = {"rc": "skipped", "why": f"no compiled kernel variant on {backend}"}
    if "timing" in _STEPS.value:
        out = tmp / "bench.json"
        args = [sys.executable, "launch/bench.py", "--modes=full,prefix_warm,rcllm", "--attention_impl=xla",
                "--peers=", f"--history_len={_HIST.value}", f"--num_candidates={_CANDS.value}",
                f"--num_users={_USERS.value}", f"--calibration_requests={_CALIB.value}", f"--output_json={out}"]
        if backend in ("gpu", "tpu"):  # rcllm through the compiled kernels too (interpreted on CPU: not a timing)
            args.append("--compare_impl")
        if _ASSETS.value:
            assets = Path(_ASSETS.value).resolve()
            args += [f"--model={assets / 'model'}", "--random_weights", "--head=label",
                     f"--data_dir={assets / 'ml-100k'}"]
        else:
            args += ["--head=slot", "--candidates=retrieved", "--candidate_order=retriever"]
        r = _run(args, left())
        if out.exists():
            rows = {x["mode"]: x for x in json.loads(out.read_text())["results"]}
            p50 = {m: rows[m]["ttft_p50_s"] for m in ("full", "prefix_warm", "rcllm", "rcllm@pallas") if m in rows}
            r["ttft_p50_s"] = p50
            r["config"] = {"history_len": _HIST.value, "num_candidates": _CANDS.value, "requests": _USERS.value,
                           "random_weights": bool(_ASSETS.value)}
            if p50.get("rcllm"):
                r["prefix_warm_over_rcllm"] = p50.get("prefix_warm", 0) / p50["rcllm"]
                r["full_over_rcllm"] = p50.get("full", 0) / p50["rcllm"]
            if p50.get("rcllm@pallas"):
                r["prefix_warm_over_rcllm_pallas"] = p50.get("prefix_warm", 0) / p50["rcllm@pallas"]
        report["steps"]["timing"] = r
    k = report["steps"].get("kernels", {})
    report["kernels_verified"] = bool(k.get("rc") == 0 and k.get("tests", 0) > k.get("skipped", 0))
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(report, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"device check on {report['device']} ({backend}, jax {report['jax']})")
    print(f"{'step':<8} {'outcome':<28} {'wall s':>7}")
    for name, s in report["steps"].items():
        what = s.get("why") or (f"{s['tests'] - s['failures'] - s['errors'] - s['skipped']}/{s['tests']} passed, "
                                f"{s['skipped']} skipped" if "tests" in s else f"rc {s['rc']}")
        print(f"{name:<8} {what:<28} {s.get('wall_s', 0):7.1f}")
    t = report["steps"].get("timing", {})
    for m, v in t.get("ttft_p50_s", {}).items():
        print(f"  TTFT p50 {m:<13} {v * 1e3:9.2f} ms")
    if "prefix_warm_over_rcllm" in t:
        print(f"  prefix_warm / rcllm: {t['prefix_warm_over_rcllm']:.1f}x (target >= 10x); "
              f"full / rcllm: {t['full_over_rcllm']:.1f}x")
    if report["kernels_verified"]:
        print(f"kernels verified on {backend}: add {backend!r} to rcllm_jax.kernels.VERIFIED_BACKENDS")
    print(f"wrote {_OUT.value}")
    failed = [n for n, s in report["steps"].items() if s.get("rc") not in (0, "skipped")]
    if failed:
        raise SystemExit(f"device check: {', '.join(failed)} failed (see {_OUT.value})")


if __name__ == "__main__":
    app.run(main)
