"""Start-up of the serving path, from a cold Python process (goal 2 of issue 27).

Each program below runs in a fresh interpreter (``python -c ...``, the repository's ``src`` first on the
path), ``--repeats`` times, interleaved; the wall time of the whole process is measured from here and the
median is reported:

* ``torch``: ``import torch`` alone (the floor every program pays);
* ``torchvision``: ``import torch, torchvision`` (the encoders are torchvision networks: every model pays it);
* ``predictor_import``: ``from diffmic.inference import Predictor``;
* ``load_predict``: that import, ``Predictor.load(<model folder>)`` and one prediction of one 40 px image
  (the committed legacy model folder ``tests/data/legacy/model``: a tiny network, so the time is start-up,
  not compute).

* ``load_predict_onnx``: the same with ``Predictor.load(<ONNX model folder>, backend="onnx")``: the folder's
  ONNX graphs run by ONNX Runtime on the CPU, without timm or torchvision. Unless ``--onnx-model`` names a
  folder exported with ``diffmic export --onnx``, the model folder (``--model``) is exported first into a
  temporary folder: a copy of it with ``encoder_dcg.onnx`` and ``denoiser_step.onnx`` written by
  :func:`diffmic.inference.export.export_onnx` (export batch 1) and recorded in its config.json (not
  timed; needs the ``onnx`` extra). ``--no-onnx`` leaves this program out.

``startup_s`` = median(load_predict) - median(torch): what serving one image adds to ``import torch``
(target: at most 1 s); ``startup_onnx_s`` = median(load_predict_onnx) - median(torch), the same with the
ONNX backend. The ``load_predict`` programs also report which training-stack packages they imported
(``training_stack_imported``: none expected; see tests/test_startup.py), and the ONNX one whether timm,
torchvision or torch._dynamo were imported (``onnx_heavy_imported``: none expected).

Usage:  python benchmarks/bench_startup.py [--repeats 5] [--model tests/data/legacy/model] [--onnx-model DIR]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LEGACY = ROOT / "tests" / "data" / "legacy"
sys.path.insert(0, str(HERE))
from _common import cpu_busy_s, emit, log, wait_for_quiet  # noqa: E402

TARGET_S = 1.0
TRAINING_STACK = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "torchmetrics",
    "matplotlib",
)  # scipy: listed apart


ONNX_HEAVY = ("timm", "torchvision", "torch._dynamo", "onnx")


def export_onnx_copy(model: Path, dest: Path) -> Path:
    """A copy of the model folder ``model`` with its ONNX graphs (export batch 1) recorded in its config.json."""
    import shutil

    from make_legacy import register

    from diffmic.inference.export import CONFIG, export_onnx, load_model_folder

    register()  # the legacy fixture's encoder (harmless for any other folder)
    portable = load_model_folder(model)
    shutil.copytree(model, dest)
    meta = json.loads((dest / CONFIG).read_text())
    meta["onnx"] = export_onnx(portable.model, portable.cfg, dest, batch=1)
    (dest / CONFIG).write_text(json.dumps(meta, indent=2))
    return dest


def programs(model: Path, image: Path, onnx_model: Path | None = None) -> dict[str, str]:
    path = f"import sys; sys.path[:0] = [{str(ROOT / 'src')!r}, {str(LEGACY)!r}]\n"
    progs = {
        "torch": "import torch\n",
        "torchvision": "import torch, torchvision\n",
        "predictor_import": path + "from diffmic.inference import Predictor\n",
        "load_predict": path
        + "from diffmic.inference import Predictor\n"
        + "from make_legacy import register\n"
        + "register()  # the fixture's small ResNet-10, registered as its encoder\n"
        + f"r = Predictor.load({str(model)!r}, device='cpu').predict([{str(image)!r}])[0]\n"
        + "import json\n"
        + f"heavy = sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r}}})\n"
        + "print(json.dumps({'label': r.label, 'heavy': heavy, "
        + "'scipy': sorted({m for m in sys.modules if m.startswith('scipy.') and m.count('.') == 1})}))\n",
    }
    if onnx_model is not None:
        progs["load_predict_onnx"] = (
            path
            + "from diffmic.inference import Predictor\n"
            + "from make_legacy import register\n"
            + "register()  # the fixture's encoder name, which its config names (no network is built)\n"
            + f"r = Predictor.load({str(onnx_model)!r}, backend='onnx').predict([{str(image)!r}])[0]\n"
            + "import json\n"
            + f"heavy = sorted(m for m in {ONNX_HEAVY!r} if m in sys.modules)\n"
            + "print(json.dumps({'label': r.label, 'heavy': heavy}))\n"
        )
    return progs


def run_once(code: str, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"start-up program failed:\n{code}\n{out.stderr[-3000:]}")
    return wall, out.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=str(LEGACY / "model"), help="exported model folder (default: the legacy one)")
    ap.add_argument("--wait-quiet", type=float, default=60.0, help="wait up to this long for a quiet CPU first")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for the programs (default: as inherited; on a busy 2-core machine two threads "
        "make the first prediction wait for a descheduled sibling)",
    )
    ap.add_argument(
        "--onnx-model",
        help="a model folder exported with `diffmic export --onnx` for the ONNX program (default: export --model "
        "into a temporary folder first)",
    )
    ap.add_argument("--no-onnx", action="store_true", help="leave the ONNX-backend program out")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(LEGACY))
    from make_legacy import legacy_images

    from diffmic.provenance import machine

    env = None if args.threads is None else {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        image = legacy_images(Path(tmp), n=1)[0]
        onnx_model = None
        if args.onnx_model:
            onnx_model = Path(args.onnx_model).resolve()
        elif not args.no_onnx:
            onnx_model = export_onnx_copy(Path(args.model).resolve(), Path(tmp) / "onnx_model")
        progs = programs(Path(args.model).resolve(), image, onnx_model)
        run_once(progs["load_predict"], env)  # warm the page cache (the weights, the packages) once
        if "load_predict_onnx" in progs:
            run_once(progs["load_predict_onnx"], env)
        result_onnx = None
        times: dict[str, list[float]] = {k: [] for k in progs}
        busy0, t0 = cpu_busy_s(), time.perf_counter()
        child = os.times()
        for i in range(max(1, args.repeats)):
            for name, code in progs.items():
                wall, stdout = run_once(code, env)
                times[name].append(wall)
                if name == "load_predict":
                    result = json.loads(stdout.strip().splitlines()[-1])
                if name == "load_predict_onnx":
                    result_onnx = json.loads(stdout.strip().splitlines()[-1])
            log(f"[startup] round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        elapsed = time.perf_counter() - t0
        busy1, child1 = cpu_busy_s(), os.times()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    foreign = None
    if busy0 is not None and busy1 is not None:
        ours = (child1.children_user + child1.children_system) - (child.children_user + child.children_system)
        foreign = round(max(0.0, (busy1 - busy0) - ours) / (elapsed * (os.cpu_count() or 1)), 3)
    startup = round(med["load_predict"] - med["torch"], 3)
    onnx_part: dict = {}
    if result_onnx is not None:
        startup_onnx = round(med["load_predict_onnx"] - med["torch"], 3)
        onnx_part = {
            "startup_onnx_s": startup_onnx,
            "onnx_meets_target": startup_onnx <= TARGET_S,
            "onnx_model": str(args.onnx_model) if args.onnx_model else f"{args.model} exported to a temporary folder",
            "onnx_heavy_imported": result_onnx["heavy"],
            "onnx_label": result_onnx["label"],
        }
    emit(
        {
            "benchmark": "startup",
            "setting": {
                "repeats": args.repeats,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS") if args.threads is None else args.threads,
                "model": str(Path(args.model)),
                "programs": {k: v.strip() for k, v in progs.items()},
                "timing": "wall time of a fresh `python -c` process, median over the repeats (interleaved)",
            },
            "median_s": med,
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "startup_s": startup,
            **onnx_part,
            "predictor_import_above_torch_s": round(med["predictor_import"] - med["torch"], 3),
            "torchvision_above_torch_s": round(med["torchvision"] - med["torch"], 3),
            "target_s": TARGET_S,
            "meets_target": startup <= TARGET_S,
            "training_stack_imported": result["heavy"],
            "scipy_subpackages_imported": result["scipy"],
            "label": result["label"],
            "foreign_cpu_share": foreign,
            "contended": None if foreign is None else foreign > 0.1,
            "waited_for_quiet": quiet,
            "machine": machine(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
