"""Run every diffmic benchmark and collect the results.

Runs ``bench_inference.py``, ``bench_train.py``, ``bench_latency.py``, ``bench_single.py``, the accuracy
study on ``runs/demo`` (``sampler_study.py``), ``bench_scaling.py``, ``bench_startup.py``,
``bench_trust_cost.py`` and ``backend_agreement.py`` (both on ``runs/demo``) one after the other as subprocesses
of the same Python interpreter (their progress goes to stderr), takes the JSON object on the last stdout line
of each, writes them all to ``benchmarks/results/latest.json`` and prints a summary JSON object as the last
stdout line. Exit status is non-zero if any benchmark failed (crash, or an equality check that did not hold).

Usage:  python benchmarks/run_all.py [--device auto] [--only inference,train,latency] [--compile] [--quick]
                                     [--retries N]   (re-run benchmarks that other programs slowed down)
(``make bench`` runs it with the project's virtual environment.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit, log, wait_for_quiet  # noqa: E402

BENCHES = ("inference", "train", "latency", "single", "accuracy", "scaling", "startup", "trust_cost", "backends")
DEMO_RUN = HERE.parent / "runs" / "demo"
QUICK = {  # --quick: a smoke run (seconds, not minutes); the numbers mean little
    "inference": ["--batch", "2", "--steps", "10", "--repeats", "1", "--wait-quiet", "0", "--sweep", ""],
    "train": ["--batch", "4", "--steps", "1", "--wait-quiet", "0", "--max-extra", "0"],
    "latency": ["--batches", "1,2", "--repeats", "1", "--wait-quiet", "0"],
    "single": ["--repeats", "1", "--wait-quiet", "0"],
    "accuracy": [],
    "scaling": ["--quick"],
    "startup": ["--repeats", "1", "--wait-quiet", "0"],
    "trust_cost": ["--images", "2", "--repeats", "1"],
    "backends": ["--limit", "8", "--batch", "4"],
}


def _last_json(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--compile", action="store_true", help="pass --compile to bench_latency (torch.compile)")
    ap.add_argument(
        "--retries",
        type=int,
        default=0,
        help="re-run a benchmark whose result is not reliable (other programs used the CPU while it "
        "ran), after waiting up to --retry-wait seconds for a quiet machine",
    )
    ap.add_argument("--retry-wait", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (numbers are not meaningful)")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = ap.parse_args(argv)

    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s): {unknown}")
    results: dict = {}
    failed: list[str] = []
    for name in chosen:
        if name == "accuracy":  # goal-1 sampler vs the truncated chain on the `make demo` checkpoint
            if not (DEMO_RUN / "checkpoints").is_dir():
                log(f"[run_all] accuracy: no trained run at {DEMO_RUN} (run `make demo` first); speed only")
                results[name] = {"skipped": f"no {DEMO_RUN}: accuracy not measured, speed only"}
                continue
            cmd = [sys.executable, str(HERE / "sampler_study.py"), "--run", str(DEMO_RUN), "--bench", "--int8"]
        elif name == "trust_cost":  # issue 27.5: what each trust output adds to one prediction, `make demo`'s model
            if not (DEMO_RUN / "checkpoints").is_dir():
                log(f"[run_all] trust_cost: no trained run at {DEMO_RUN} (run `make demo` first); not measured")
                results[name] = {"skipped": f"no {DEMO_RUN}: trust costs not measured"}
                continue
            cmd = [sys.executable, str(HERE / "bench_trust_cost.py"), "--model", str(DEMO_RUN)]
        elif name == "backends":  # issue 27's rule: ONNX Runtime against PyTorch on the demo's whole test split
            if not (DEMO_RUN / "checkpoints").is_dir():
                log(f"[run_all] backends: no trained run at {DEMO_RUN} (run `make demo` first); not measured")
                results[name] = {"skipped": f"no {DEMO_RUN}: backends not compared"}
                continue
            cmd = [sys.executable, str(HERE / "backend_agreement.py"), "--run", str(DEMO_RUN)]
            cmd += ["--variants", "onnx", "onnx_fast", "torch_bf16_nets"]  # the first one gives the main keys
        elif name == "single":
            cmd = [sys.executable, str(HERE / "bench_single.py")]
        elif name == "startup":  # issue 27.2: a cold process to one answer, above `import torch`
            cmd = [sys.executable, str(HERE / "bench_startup.py")]
        elif name == "scaling":  # goal 6; its figure stays under results/ (docs/figures is edited by hand)
            cmd = [sys.executable, str(HERE / "bench_scaling.py")]
            if not args.quick:
                cmd += ["--out-fig", str(HERE / "results" / "cost_scaling-latest.png")]
        else:
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--device", args.device]
        if name == "latency" and args.compile:
            cmd.append("--compile")
        if args.quick:
            cmd += QUICK[name]
        attempts = []
        for attempt in range(1 + max(0, args.retries)):
            if attempt:
                log(
                    f"[run_all] {name}: other programs distorted the timings; waiting for a quiet CPU before "
                    f"retry {attempt} ..."
                )
                log(f"[run_all]   {wait_for_quiet(args.retry_wait, window_s=10.0)}")
            log(f"[run_all] {' '.join(cmd)}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr streams through
            wall = time.perf_counter() - t0
            res = _last_json(proc.stdout)
            if res is None:
                res = {"error": "no JSON result line", "stdout_tail": proc.stdout[-2000:]}
            res["returncode"] = proc.returncode
            res["wall_s"] = round(wall, 1)
            reliable = res.get("reliable", not res.get("contended"))
            log(
                f"[run_all] {name}: rc={proc.returncode} in {wall:.0f}s, contended={res.get('contended')}, "
                f"reliable={reliable}"
            )
            attempts.append(
                {
                    "wall_s": res["wall_s"],
                    "contended": res.get("contended"),
                    "reliable": reliable,
                    "returncode": proc.returncode,
                }
            )
            if proc.returncode != 0 or "error" in res or reliable:
                break
        res["attempts"] = attempts
        results[name] = res
        if res["returncode"] != 0 or "error" in res:
            failed.append(name)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out.write_text(
        json.dumps({"timestamp": stamp, "quick": args.quick, "results": results}, indent=2, default=str) + "\n"
    )

    summary: dict = {"timestamp": stamp, "quick": args.quick, "results_file": str(out), "failed": failed}
    r = results.get("inference", {})
    if "ours" in r:
        summary["inference"] = {
            "batch": r["setting"]["batch"],
            "steps": r["setting"]["steps"],
            "ours_images_per_s": r["ours"]["images_per_s"],
            "baseline_images_per_s": r.get("baseline", {}).get("images_per_s"),
            "speedup": r.get("speedup"),
            "speedup_robust": r.get("speedup_robust"),
            "meets_10x": r.get("meets_target"),
            "predictions_equal": r.get("equality", {}).get("passed"),
            "contended": r.get("contended"),
        }
    r = results.get("train", {})
    if "ours" in r:
        summary["train"] = {
            "batch": r["setting"]["batch"],
            "image_size": r["setting"]["image_size"],
            "ours_images_per_s": r["ours"]["images_per_s"],
            "baseline_images_per_s": r["baseline"]["images_per_s"],
            "ours_images_per_s_uncontended": r["ours"].get("images_per_s_uncontended"),
            "baseline_images_per_s_uncontended": r["baseline"].get("images_per_s_uncontended"),
            "speedup": r.get("speedup"),
            "speedup_uncontended": r.get("speedup_uncontended_steps"),
            "meets_3x": r.get("meets_target"),
            "ours_step_peak_delta_mib": r["ours"]["memory_timed_steps"]["delta_mib"],
            "baseline_step_peak_delta_mib": r["baseline"]["memory_timed_steps"]["delta_mib"],
            "first_step_losses_equal": r.get("equality", {}).get("first_step_equal"),
            "contended": r.get("contended"),
        }
    r = results.get("latency", {})
    if "variants" in r:
        summary["latency_ddim10"] = {
            name: {k: v.get("latency_per_image_s") for k, v in entry.items() if k.startswith("batch_")}
            for name, entry in r["variants"].items()
        }
        summary["latency_ddim10"]["unit"] = "s per image (median)"
        summary["latency_ddim10"]["contended"] = r.get("contended")
    # the headline figures of issue 14
    inf, tr, acc = results.get("inference", {}), results.get("train", {}), results.get("accuracy", {})
    few = inf.get("fewstep", {})
    summary["inference_speedup"] = inf.get("speedup")
    summary["inference_speedup_robust"] = inf.get("speedup_robust")
    summary["fewstep_speedup"] = few.get("speedup_vs_released")
    summary["fewstep_sampler"] = few.get("sampler")
    fs = acc.get("fewstep_vs_reference", {})
    summary["fewstep_acc_delta"] = fs.get("test_acc_delta_pts")
    summary["fewstep_f1_delta"] = fs.get("test_f1_delta_pts")
    summary["fewstep_val_acc_delta"] = fs.get("val_acc_delta_pts")
    summary["fewstep_val_f1_delta"] = fs.get("val_f1_delta_pts")
    summary["accuracy_note"] = acc.get("skipped") or (
        f"{fs.get('name')} vs {acc.get('reference')} on {acc.get('run')}, whole test split" if fs else None
    )
    summary["int8_head_on_demo_test"] = acc.get("int8_head", {}).get("test")
    summary["single_image_s"] = results.get("single", {}).get("single_image_s")
    summary["single_image_s_fp32"] = results.get("single", {}).get("single_image_s_fp32")
    summary["single_image_s_bf16_nets"] = results.get("single", {}).get("single_image_s_bf16_nets")
    st = results.get("startup", {})
    summary["startup_s"] = st.get("startup_s")  # cold `Predictor.load` + one image, minus `import torch`
    summary["startup_torchvision_s"] = st.get("torchvision_above_torch_s")
    summary["startup_training_stack_imported"] = st.get("training_stack_imported")
    summary["startup_onnx_s"] = st.get("startup_onnx_s")  # the same with the ONNX Runtime backend
    be = results.get("backends", {})  # the ONNX Runtime backend against PyTorch, demo test split
    summary["throughput_speedup"] = be.get("throughput_speedup")
    summary["classes_changed"] = be.get("classes_changed")
    summary["prob_max_abs_diff"] = be.get("prob_max_abs_diff")
    # the fast path and bf16 networks under the same rule: classes changed, probability moves, speed-up
    summary["backend_variants"] = be.get("variants")
    tc = results.get("trust_cost", {})
    summary["trust_cost_per_image_s"] = tc.get("per_image_s") or tc.get("skipped")
    summary["fast_path"] = tc.get("fast_path")  # predict --fast: speed-up, classes changed (must be 0)
    summary["train_speedup"] = tr.get("speedup")
    summary["train_speedup_uncontended"] = tr.get("speedup_uncontended_steps")
    sc = results.get("scaling", {})
    if "dominant" in sc:  # goal 6: one sentence per factor, built from the measurements
        dom = sc["dominant"]
        items = dom.items() if isinstance(dom, dict) else ((d.get("factor"), d) for d in dom)
        summary["scaling"] = {f: d.get("statement") for f, d in items}
        summary["scaling_reliable"] = sc.get("reliable")
    emit(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
