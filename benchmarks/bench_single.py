"""One image, file to answer, through the Predictor's serving path (goal 4 of issue 14).

Setting: the default model preset (224 px, ResNet-18 encoder, ResNet-18 DCG streams, denoiser width 6144,
C = 7, T = 1000; random-init weights in eval mode), one 600x450 JPEG on disk (HAM10000's size).
``Predictor.predict([path])`` = decode + preprocess + DCG + encoder + the sampler + read-out. Sampler: the
few-step sampler of goal 1 (``--sampler ddim --steps 5``, from the prior mean, t_start = window - 1, K = 1)
and, for comparison, DDIM-10 from noise (the previous latency benchmark's setting).

Variants of the head (the 6144-wide denoiser MLP, memory-bandwidth bound at batch 1):
* ``fp32``;
* ``onnx`` — the same network exported (``export_onnx``, batch 1) and served by ONNX Runtime on the CPU
  (``Predictor.load(folder, backend="onnx")``'s network);
* ``int8`` — ``torch.ao.quantization.quantize_dynamic`` of the denoiser's Linear layers (weights int8,
  activations quantised on the fly). Whether it changes predicted classes is checked on a trained
  checkpoint's test split by ``sampler_study.py --int8`` (random weights cannot say);
* ``bf16_nets`` — the DCG and encoder passes under CPU bf16 autocast (oneDNN, this CPU's
  ``avx512_bf16``), the head in fp32; whether it changes classes is checked on the `make demo` test split
  by ``backend_agreement.py --variants torch_bf16_nets``.

Also reports the time of each stage (decode+preprocess, DCG, encoder, one head step) at batch 1.

Usage:  python benchmarks/bench_single.py [--repeats 7] [--window 250] [--steps 5]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import Phase, bf16_networks, emit, log, machine_info, set_threads, wait_for_quiet  # noqa: E402

PAPER_S_PER_IMAGE = 0.056


def build_predictor(classes: int, sampler: dict):
    from diffmic.config import Config
    from diffmic.inference.predictor import Predictor
    from diffmic.training.module import DiffMICModule

    cfg = Config().to_dict()
    cfg["eval"].update(sampler)
    module = DiffMICModule(cfg, classes, [f"c{i}" for i in range(classes)])
    return Predictor(module.eval(), device="cpu")


def onnx_predictor(predictor, folder: Path):
    """The same network served by ONNX Runtime (``backend="onnx"``): its two graphs exported at batch 1
    into ``folder`` and loaded as :class:`~diffmic.inference.onnx_backend.OnnxNetwork`."""
    import onnxruntime as ort

    from diffmic.inference.export import PortableModel, export_onnx
    from diffmic.inference.onnx_backend import OnnxNetwork, _session
    from diffmic.inference.predictor import Predictor

    mod = predictor.module
    export_onnx(mod.model, mod.cfg, folder, batch=1)
    enc, step = (folder / "encoder_dcg.onnx", folder / "denoiser_step.onnx")
    net = OnnxNetwork(
        _session(ort, enc, enc.read_bytes()),
        _session(ort, step, step.read_bytes()),
        variant=mod.model.variant,
        num_classes=mod.model.num_classes,
        uses_dcg=mod.model.uses_dcg,
    )
    return Predictor(PortableModel(net, mod.cfg, mod.class_names), device="cpu")


def quantise_head(predictor) -> None:
    m = predictor.module.model
    m.denoiser = torch.ao.quantization.quantize_dynamic(m.denoiser, {torch.nn.Linear}, dtype=torch.qint8)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs), secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--window", type=int, default=250, help="truncated window (t_start = window - 1)")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wait-quiet", type=float, default=20.0)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    from PIL import Image

    # removed after the timings, and at exit if a variant fails (the ONNX files are ~30 MB)
    tmpdir = tempfile.TemporaryDirectory(prefix="diffmic-bench-single-")
    tmp = Path(tmpdir.name)
    img = tmp / "lesion.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(img, quality=90)
    few = {"sampler": args.sampler, "steps": args.steps, "start": "mean", "t_start": args.window - 1, "num_samples": 1}
    ddim10 = {"sampler": "ddim", "steps": 10, "start": "noise", "t_start": None, "num_samples": 1}
    quiet = wait_for_quiet(args.wait_quiet)
    result: dict = {
        "benchmark": "single_image",
        "threads": threads,
        "image": "600x450 JPEG -> 224 px",
        "fewstep_sampler": few,
        "variants": {},
    }
    with Phase(torch.device("cpu")) as ph:
        for name, smp, q in (
            ("fewstep_fp32", few, False),
            ("fewstep_int8", few, True),
            ("fewstep_onnx", few, False),
            ("fewstep_bf16_nets", few, False),
            ("ddim10_noise_fp32", ddim10, False),
        ):
            p = build_predictor(args.classes, smp)
            if q:
                quantise_head(p)
            if name.endswith("bf16_nets"):
                bf16_networks(p.module.model)
            if name.endswith("onnx"):  # the same network, served by ONNX Runtime
                p = onnx_predictor(p, tmp)
            med, secs = timed(lambda: p.predict([img]), args.repeats)
            result["variants"][name] = {
                "median_s": round(med, 4),
                "runs_s": [round(s, 4) for s in secs],
                "vs_paper_3090": round(med / PAPER_S_PER_IMAGE, 2),
            }
            log(f"[bench_single] {name}: {med:.4f} s per image (file to answer)")
        # stage breakdown at batch 1 (fp32)
        p = build_predictor(args.classes, few)
        m = p.module.model
        x, ids = p._load_images([img])
        t = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            g = m.guide(x)
            feat = m.encode(x)
            mu = torch.softmax(g.z_fused, -1)
            stages = {
                "decode_preprocess_s": timed(lambda: p._load_images([img]), args.repeats)[0],
                "dcg_s": timed(lambda: m.guide(x), args.repeats)[0],
                "encoder_s": timed(lambda: m.encode(x), args.repeats)[0],
                "head_step_fp32_s": timed(lambda: m.eps(feat, mu, t, mu), args.repeats)[0],
            }
            quantise_head(p)
            stages["head_step_int8_s"] = timed(lambda: m.eps(feat, mu, t, mu), args.repeats)[0]
            bf16_networks(m)
            stages["dcg_bf16_s"] = timed(lambda: m.guide(x), args.repeats)[0]
            stages["encoder_bf16_s"] = timed(lambda: m.encode(x), args.repeats)[0]
        result["stages_batch1"] = {k: round(v, 4) for k, v in stages.items()}
    tmpdir.cleanup()
    result["foreign_cpu_share"] = ph.foreign_cpu_share
    result["contended"] = bool((ph.foreign_cpu_share or 0) > 0.1)
    # fp32 is the headline: the int8 head changed 4 of 3,004 predicted classes on the `make demo` test
    # split (sampler_study.py --int8, 2026-12-02), which goal 4 does not allow
    fp32 = result["variants"]["fewstep_fp32"]["median_s"]
    result["single_image_s"] = fp32
    result["single_image_s_fp32"] = fp32
    result["single_image_s_int8"] = result["variants"]["fewstep_int8"]["median_s"]
    result["single_image_s_onnx"] = result["variants"]["fewstep_onnx"]["median_s"]
    result["single_image_s_bf16_nets"] = result["variants"]["fewstep_bf16_nets"]["median_s"]
    result["meets_target"] = bool(fp32 <= PAPER_S_PER_IMAGE)
    result["pre_run_wait"] = quiet
    result["machine"] = machine_info(torch.device("cpu"))
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
