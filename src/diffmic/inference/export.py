"""A portable model folder that loads without Lightning: ``diffmic export --run RUN --out DIR``.

The folder holds

* ``model.safetensors`` — the network's weights (the EMA denoiser when the run evaluates with it),
  keys of :class:`~diffmic.nn.diffmic.DiffMIC`;
* ``config.json`` — everything needed to rebuild and use it: ``format``/``format_version``, the
  diffmic version, the class names, the architecture (``DiffMIC(**architecture)``), the
  preprocessing, the sampler settings, the noise schedule, the fitted calibration when the
  checkpoint has one (``calibration``, passed through as stored), the full training config, and the
  SHA-256 of the weights file (checked on load);
* ``MODEL_CARD.md`` — training data and split, test metrics with their intervals when the run was
  tested, intended use and limits, the paper reference;
* with ``--onnx``: ``encoder_dcg.onnx`` (image -> features ρ(x), the fused DCG prior, the denoiser's
  guidance and the DCG's logits, saliency and ROIs) and ``denoiser_step.onnx`` (one noise prediction
  ε(ρ(x), y_t, t, guidance)), with their SHA-256 and sizes in config.json; see :func:`export_onnx`.
  ``Predictor.load(folder, backend="onnx")`` serves them with ONNX Runtime
  (:mod:`diffmic.inference.onnx_backend`).

:func:`load_model_folder` reads it back with PyTorch, safetensors and the ``nn`` layer only;
:class:`~diffmic.inference.predictor.Predictor` accepts it (``Predictor.load(folder)``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffmic import __version__
from diffmic.atomic import atomic_path
from diffmic.training.loading import FILE_MAGIC  # light: imports only torch

if TYPE_CHECKING:
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.nn.diffmic import DiffMIC

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExportError",
    "PortableModel",
    "export_model",
    "export_onnx",
    "is_model_folder",
    "load_model_folder",
]

FORMAT = "diffmic-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"
ONNX_ENCODER = "encoder_dcg.onnx"
ONNX_STEP = "denoiser_step.onnx"
PAPER = (
    "Yang, Y., Fu, H., Aviles-Rivero, A. I., Schönlieb, C.-B., Zhu, L.: DiffMIC: Dual-Guidance "
    "Diffusion Network for Medical Image Classification. MICCAI 2023 (arXiv:2303.10610)."
)


class ExportError(ValueError):
    """The export cannot be written or the model folder cannot be read (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Loading (no Lightning)


class PortableModel(nn.Module):
    """What :class:`Predictor` needs from a trained model: ``model`` (:class:`DiffMIC`, or a stand-in
    without parameters such as :class:`~diffmic.inference.onnx_backend.OnnxNetwork`, which states its
    ``device``), ``cfg``, ``class_names``, ``schedule`` (built on the model's device), ``calibration``
    (or ``None``)."""

    def __init__(
        self, model: Any, cfg, class_names: list[str], calibration: Any = None, meta: dict | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.class_names = list(class_names)
        self.calibration = calibration
        self.meta = dict(meta or {})
        self._schedule: NoiseSchedule | None = None

    @property
    def schedule(self):
        from diffmic.diffusion.schedule import NoiseSchedule

        dev = _model_device(self.model)
        s = self._schedule
        if s is None or s.betas.device != dev:
            d = self.cfg.diffusion
            s = NoiseSchedule.build(d.schedule, d.num_timesteps, d.beta_start, d.beta_end).to(dev)
            self._schedule = s
        return s


def _model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter, else the ``device`` a network without parameters
    states (the ONNX backend's)."""
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    dev = getattr(model, "device", None)
    if dev is None:
        raise TypeError(f"{type(model).__name__} has neither parameters nor a `device`: no device for the schedule")
    return torch.device(dev)


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a folder meant as a model folder: ``config.json`` saying ``format: diffmic-model``, or
    ``config.json`` beside ``model.safetensors`` (a broken one then gets :func:`load_model_folder`'s
    error, not a run folder's)."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG).is_file()):
        return False
    if (p / WEIGHTS).is_file():
        return True
    try:
        if (p / CONFIG).stat().st_size > MAX_CONFIG_BYTES:
            return False
        meta = json.loads((p / CONFIG).read_text())
    except (ValueError, OSError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# A model folder is untrusted input, checked like a checkpoint (training.checkpoint: the same rules and
# wording; not imported from there, because a model folder must load without Lightning): its schema,
# then the weights file's header (sizes and offsets against the file), then the model its config
# describes, built on the ``meta`` device (no memory) and compared with the file, before anything is
# allocated or loaded.

#: config.json is a few KB; a larger one is refused unread
MAX_CONFIG_BYTES = 16 * 2**20
#: the safetensors header (names, dtypes, shapes, offsets) of a diffmic model is well under 1 MB
_MAX_HEADER_BYTES = 100 * 2**20
#: a model folder's config may describe at most this many bytes of weights beyond what its weights
#: file holds (as training.checkpoint._SIZE_SLACK_BYTES for a checkpoint)
_SIZE_SLACK_BYTES = 16 * 2**20
_MAX_CLASSES = 100_000  # as training.checkpoint.check_sizes_before_building

_ST_DTYPES = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
_TORCH_ST = {dt: name for name, (_, dt) in _ST_DTYPES.items()}


def _file_kind(head: bytes) -> str:
    if head.startswith(b"\x80"):
        return "a Python pickle (diffmic never unpickles the weights of a model folder: they could run code)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, such as a PyTorch file written by torch.save (pickles; never loaded from a model folder)"
    what = next((name for magic, name in FILE_MAGIC.items() if head.startswith(magic)), None)
    if what is None:
        text = bool(head) and all(32 <= c < 127 or c in (9, 10, 13) for c in head)
        what = "a text file" if text else "something else"
    return what


def _refuse(path: Path, problem: str) -> ExportError:
    return ExportError(
        f"{path}: {problem}. The model folder was edited or is not trustworthy; nothing was allocated or "
        "loaded. Use a folder written by `diffmic export` (export it again from the run)."
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_meta(cfg_path: Path) -> dict:
    """config.json, checked for the keys and types :func:`load_model_folder` uses."""
    try:
        size = cfg_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise _refuse(
                cfg_path, f"{size / 2**20:.1f} MiB, more than a model config can be ({MAX_CONFIG_BYTES // 2**20} MiB)"
            )
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ExportError(f"{cfg_path}: not valid JSON ({str(exc)[:200]}); export the model again") from exc
    except OSError as exc:
        raise ExportError(f"{cfg_path} cannot be read: {exc}") from exc
    if not isinstance(meta, dict):
        raise _refuse(cfg_path, f"must hold a JSON object (written by `diffmic export`), got a JSON {_json_type(meta)}")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{cfg_path}: not a diffmic model config (format={meta.get('format')!r})")
    version = meta.get("format_version", 0)
    if not _is_int(version) or version < 1:
        raise _refuse(cfg_path, f"'format_version' must be a whole number >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{cfg_path}: format_version {version} is newer than this diffmic ({__version__}) reads "
            f"({FORMAT_VERSION}); upgrade diffmic"
        )
    for key, kind in (("class_names", list), ("architecture", dict), ("config", dict)):
        if key not in meta:
            raise _refuse(cfg_path, f"missing key '{key}'")
        if not isinstance(meta[key], kind):
            want = "a JSON list" if kind is list else "a JSON object"
            raise _refuse(cfg_path, f"'{key}' must be {want}, got a JSON {_json_type(meta[key])}")
    names = meta["class_names"]
    if not 1 <= len(names) <= _MAX_CLASSES:
        raise _refuse(cfg_path, f"'class_names' lists {len(names)} classes (1 to {_MAX_CLASSES} allowed)")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip() or len(n) > 1000:
            raise _refuse(cfg_path, f"class_names[{i}] must be a non-empty text of at most 1000 characters, got {n!r}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise _refuse(cfg_path, f"'class_names' lists the class {n!r} twice; every class needs its own name")
        seen.add(n)
    num = meta.get("num_classes", len(names))
    if not _is_int(num) or num != len(names):
        raise _refuse(cfg_path, f"'num_classes' is {num!r} but 'class_names' lists {len(names)} classes")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
        raise _refuse(cfg_path, f"'weights_sha256' must be 64 hex digits, got {digest!r}")
    if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
        raise _refuse(
            cfg_path, f"'calibration' must be a JSON object or null, got a JSON {_json_type(meta['calibration'])}"
        )
    _check_ood(meta, cfg_path)
    if isinstance(meta.get("calibration"), dict):  # calibrator, referral threshold, conformal sets
        from diffmic.trust.evaluate import check_trust

        try:
            check_trust(meta["calibration"], len(names))
        except ValueError as exc:
            raise _refuse(cfg_path, f"calibration{exc}") from exc
    return meta


def _check_ood(meta: dict, cfg_path: Path, feature_dim: int | None = None) -> None:
    """``calibration.ood`` (the out-of-distribution flag, trust.ood): its score, threshold, rate and
    Mahalanobis statistics (shapes, sizes, finite values); absent or null = no flag."""
    from diffmic.trust.ood import check_ood

    cal = meta.get("calibration")
    if not isinstance(cal, dict) or cal.get("ood") is None:
        return
    try:
        check_ood(cal["ood"], num_classes=len(meta["class_names"]), feature_dim=feature_dim)
    except ValueError as exc:
        raise _refuse(cfg_path, f"calibration.ood{exc}") from exc


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _read_safetensors_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from the header of ``weights``, read without loading any tensor;
    the header's sizes and offsets are checked against the file (safetensors format: 8 bytes
    little-endian header length, a JSON header, then the tensors back to back)."""
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            head = fh.read(9)  # the 8-byte header length and the header's first byte ('{')
            n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
            fits = head[8:9] == b"{" and 0 < n <= min(size - 8, _MAX_HEADER_BYTES)
            raw = head[8:] + fh.read(n - 1) if fits else b""
    except OSError as exc:
        raise ExportError(f"{weights} cannot be read: {exc}") from exc
    if size == 0:
        raise _refuse(weights, "the file is empty (0 bytes): truncated or not a safetensors file")
    if head[8:9] != b"{" or n < 2:
        raise _refuse(weights, f"not a safetensors file: it is {_file_kind(head)}")
    if n > _MAX_HEADER_BYTES:
        raise _refuse(weights, f"not a safetensors file: its header length field says {n} bytes")
    if n > size - 8:
        raise _refuse(weights, f"truncated: its header is {n} bytes long but the file holds {size} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _refuse(weights, f"not a safetensors file: its header is not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise _refuse(weights, "not a safetensors file: its header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES):
            raise _refuse(weights, f"tensor '{name}': no known dtype in the header ({str(entry)[:200]})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise _refuse(weights, f"tensor '{name}': the header gives no valid shape ({str(shape)[:200]})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _refuse(weights, f"tensor '{name}': the header gives no valid data_offsets ({str(offsets)[:200]})")
        begin, end = offsets
        nbytes = _ST_DTYPES[entry["dtype"]][0] * _prod(shape)
        if end < begin or end - begin != nbytes:
            raise _refuse(
                weights,
                f"tensor '{name}': the header gives shape {shape} ({entry['dtype']}, {nbytes} bytes) but "
                f"data_offsets {offsets} ({end - begin} bytes): the header lies about the sizes",
            )
        if end > data_len:
            raise _refuse(
                weights,
                f"truncated: tensor '{name}' ends at byte {end} of the data, which holds {data_len} bytes",
            )
        spans.append((begin, end, name))
        out[name] = (entry["dtype"], tuple(shape))
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin != pos:
            problem = f"tensors '{prev}' and '{name}' overlap" if begin < pos else f"a gap before tensor '{name}'"
            raise _refuse(weights, f"the header's data_offsets are inconsistent: {problem}")
        pos, prev = end, name
    if pos != data_len:
        raise _refuse(weights, f"the header describes {pos} bytes of tensors but the file holds {data_len}")
    return out


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _architecture(meta: dict, cfg, cfg_path: Path) -> dict:
    """The keyword arguments of ``DiffMIC`` for this folder: derived from its validated training
    config (as ``training.module.build_model`` derives them), and required to equal the
    ``architecture`` the folder states. Initial-weight files are never read (``None``)."""
    from diffmic.config import model_kwargs
    from diffmic.nn.diffmic import DiffMIC, architecture

    try:
        kwargs = model_kwargs(cfg)
    except ValueError as exc:
        raise _refuse(cfg_path, f"its config does not describe a model ({exc})") from exc
    kwargs.update(num_classes=len(meta["class_names"]), encoder_weights=None, dcg_weights=None, pretrained=None)
    # what DiffMIC records as its hparams (and export wrote as 'architecture') for these arguments
    expected = json.loads(json.dumps(architecture(**kwargs), default=str))
    stated = {**meta["architecture"], "encoder_weights": None, "dcg_weights": None, "pretrained": None}
    if stated.get("denoiser_input") == "released":
        stated.pop("denoiser_input")
    if stated.get("encoder_kwargs") == {}:
        stated.pop("encoder_kwargs")
    params = set(inspect.signature(DiffMIC).parameters)
    for key in sorted(set(stated) - set(expected)):
        what = "is not a DiffMIC setting" if key not in params else "is not in the training config"
        raise _refuse(cfg_path, f"architecture.{key} {what}")
    for key in sorted(expected):
        if key not in stated:
            raise _refuse(cfg_path, f"missing key 'architecture.{key}'")
        if stated[key] != expected[key] or type(stated[key]) is not type(expected[key]):
            raise _refuse(
                cfg_path,
                f"architecture.{key} is {stated[key]!r}, but the training config in the same file gives "
                f"{expected[key]!r}",
            )
    return kwargs


def _check_model_against_weights(kwargs: dict, header: dict, weights: Path, cfg_path: Path) -> None:
    """Build the model on the ``meta`` device (no memory), then refuse it when it needs more bytes
    than the weights file holds, or when its tensors (names, shapes, dtypes) differ from the file's."""
    from diffmic.nn.diffmic import DiffMIC

    try:
        with torch.device("meta"):
            meta_model = DiffMIC(**kwargs)
    except Exception as exc:
        raise _refuse(
            cfg_path, f"its config does not describe a buildable model ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    own = {k: v for k, v in meta_model.state_dict().items()}
    need = sum(t.numel() * t.element_size() for t in own.values())
    size = weights.stat().st_size
    if need > size + _SIZE_SLACK_BYTES:
        big = max(own, key=lambda k: own[k].numel() * own[k].element_size())
        raise _refuse(
            cfg_path,
            f"describes a model of {need / 2**30:.2f} GiB (largest tensor '{big}' {list(own[big].shape)}; "
            f"architecture.hidden_dim={kwargs.get('hidden_dim')}) that {weights} ({size / 2**20:.1f} MiB) cannot "
            "hold",
        )
    problems = [f"missing {k}" for k in sorted(set(own) - set(header))]
    problems += [f"unexpected {k}" for k in sorted(set(header) - set(own))]
    for k in sorted(set(own) & set(header)):
        dtype, shape = header[k]
        if tuple(own[k].shape) != shape:
            problems.append(f"{k}: shape {list(shape)} in the file, {list(own[k].shape)} in {CONFIG}'s architecture")
        elif _TORCH_ST.get(own[k].dtype) != dtype:
            problems.append(f"{k}: dtype {dtype} in the file, {_TORCH_ST.get(own[k].dtype, own[k].dtype)} expected")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} differences)" if len(problems) > 5 else "")
        raise _refuse(weights, f"its tensors do not match the model {cfg_path} describes: {shown}")


def folder_config(meta: dict, cfg_path: Path, eval_overrides: dict | None = None):
    """The validated :class:`~diffmic.config.Config` of a model folder's ``config.json`` (read by
    :func:`_read_meta`), with ``eval.*`` settings overridden."""
    from diffmic.config import ConfigError, config_from_dict

    config = dict(meta["config"])
    if eval_overrides:
        known = config.get("eval", {}) if isinstance(config.get("eval", {}), dict) else {}
        bad = set(eval_overrides) - set(known)
        if bad:
            raise ExportError(f"unknown eval settings {sorted(bad)}; valid: {sorted(known)}")
        config["eval"] = {**known, **eval_overrides}
    try:
        return config_from_dict(config, source=str(cfg_path))
    except ConfigError as exc:
        raise ExportError(f"{cfg_path}: {exc}") from exc


def load_model_folder(path: str | os.PathLike, eval_overrides: dict | None = None) -> PortableModel:
    """Rebuild the model of an exported folder (strict weights; eval.* settings may be overridden).

    The folder is untrusted input: ``config.json`` (schema, types, class names), the weights file's
    header (sizes and offsets against the file, read without loading a tensor), its SHA-256, the
    training config, and the model that config describes (built on the ``meta`` device and compared
    with the file's tensors and size) are all checked before any tensor is allocated; each problem
    raises :class:`ExportError` naming the file and the key."""
    from safetensors.torch import load_file

    from diffmic.nn.diffmic import DiffMIC, variant_parts

    folder = Path(path)
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError(
            f"'{folder}' is not a diffmic model folder: it needs {CONFIG} and {WEIGHTS} (written by `diffmic export`)"
        )
    meta = _read_meta(cfg_path)
    header = _read_safetensors_header(weights)
    digest = meta.get("weights_sha256")
    if digest and _sha256(weights) != digest.lower():
        raise ExportError(f"{weights}: SHA-256 differs from {CONFIG} (file changed or truncated); re-export it")
    cfg = folder_config(meta, cfg_path, eval_overrides)
    kwargs = _architecture(meta, cfg, cfg_path)
    if variant_parts(kwargs["variant"]).diffusion:  # rho(x) has hidden_dim features
        _check_ood(meta, cfg_path, feature_dim=int(kwargs["hidden_dim"]))
    _check_model_against_weights(kwargs, header, weights, cfg_path)
    model = DiffMIC(**kwargs)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors' own checks (SafetensorError) on a file that passed ours
        raise _refuse(weights, f"could not be read ({type(exc).__name__}: {str(exc)[:300]})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not match the architecture in {CONFIG}: {str(exc)[:600]}") from exc
    model.eval()
    return PortableModel(model, cfg, meta["class_names"], meta.get("calibration"), meta)


# ----------------------------------------------------------------------------------------------
# Writing


def _preprocessing(cfg) -> dict:
    from diffmic.data.transforms import PREPROCESS_VERSION, norm_stats

    mean, std = norm_stats(cfg.data.in_chans)
    return {
        "image_size": cfg.data.image_size,
        "in_chans": cfg.data.in_chans,
        "steps": [
            "convert to RGB (in_chans=3) or grey (in_chans=1)",
            "centre square crop",
            f"bilinear antialiased resize to {cfg.data.image_size}x{cfg.data.image_size}",
            "scale to [0, 1]",
            "normalise with mean/std per channel",
        ],
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW float32",
        "preprocess_version": PREPROCESS_VERSION,
        "reference": "diffmic.data.transforms.decode_image + build_transform(train=False)",
    }


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _metric_line(name: str, val: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"| {name} | {_fmt(val)} | [{_fmt(ci[0])}, {_fmt(ci[1])}] |"
    if isinstance(ci, dict) and {"low", "high"} <= set(ci):
        return f"| {name} | {_fmt(val)} | [{_fmt(ci['low'])}, {_fmt(ci['high'])}] |"
    return f"| {name} | {_fmt(val)} | not computed |"


def _ood_line(cal: Any) -> str:
    from diffmic.trust.ood import rule_text

    if not isinstance(cal, dict):
        return "none (the model was not calibrated)"
    return rule_text(cal.get("ood"))


def _referral_line(meta: dict) -> str:
    """The referral rule the exported model applies (Predictor.referral_rule), in words."""
    from diffmic.nn.diffmic import variant_parts
    from diffmic.trust.evaluate import applied_rule

    cfg = meta["config"]
    ev, variant = cfg["eval"], cfg["model"]["variant"]
    cal = meta.get("calibration")
    k = int(ev["num_samples"]) if variant_parts(variant).diffusion else None
    return applied_rule(cal if isinstance(cal, dict) else None, float(ev["refer_threshold"]), k)


def _calibration_line(meta: dict) -> str:
    """The stored calibration in words (the fitted values are in config.json's `calibration`)."""
    from diffmic.trust.evaluate import describe_calibration

    cal = meta.get("calibration")
    text = describe_calibration(cal if isinstance(cal, dict) else None, list(meta["class_names"]))
    return text + (" (the fitted values are in config.json, `calibration`)" if isinstance(cal, dict) else "")


def _model_card(meta: dict, metrics: dict | None, fit_summary: dict | None) -> str:
    """README.md of an exported model folder: the model, its training data, its test metrics, the
    intended use and limits, the files."""
    cfg = meta["config"]
    names = meta["class_names"]
    lines = [
        f"# DiffMIC model card: {cfg['data']['dataset']} ({len(names)} classes)",
        "",
        f"Exported by diffmic {__version__} on {meta['exported']} from `{meta['source']['checkpoint']}` "
        f"(trained with diffmic {meta['source']['diffmic_version']}).",
        "",
    ]
    lines += _card_model(meta)
    lines += _card_training(cfg["data"], fit_summary)
    lines += ["", "## Test metrics", ""]
    lines += _card_test(metrics)
    lines += _card_use_and_files(meta)
    return "\n".join(lines)


def _card_model(meta: dict) -> list[str]:
    """The model card's ``## Model``: architecture, read-out, referral, calibration, classes."""
    cfg = meta["config"]
    model, ev = cfg["model"], cfg["eval"]
    names = meta["class_names"]
    return [
        "## Model",
        "",
        f"DiffMIC variant `{model['variant']}`: image encoder `{model['encoder']}`, DCG streams "
        f"`{model['dcg_global']}` / `{model['dcg_local']}`, denoiser width {model['hidden_dim']}, "
        f"T = {cfg['diffusion']['num_timesteps']} ({cfg['diffusion']['schedule']} schedule). "
        f"Initial backbone weights: {_pretrained_text(model)}.",
        f"Prediction: {ev['sampler']} sampler, {ev['steps']} steps, {ev['num_samples']} sample(s) per image "
        f"({ev['aggregate']}), readout temperature {ev['temperature']}."
        + (
            f" The predicted class and probabilities come from the deterministic read-out from the prior "
            f"mean in {ev['point_steps']} denoiser calls (eval.point_steps); the samples give the agreement."
            if ev.get("point_steps")
            else ""
        ),
        f"Referral rule: {_referral_line(meta)}.",
        f"Calibration: {_calibration_line(meta)}.",
        f"Out-of-distribution flag: {_ood_line(meta.get('calibration'))}.",
        "",
        "Classes (output order): " + ", ".join(f"{i} {n}" for i, n in enumerate(names)),
        "",
    ]


def _card_training(data: dict, fit_summary: dict | None) -> list[str]:
    """The model card's ``## Training data``: the data set and split, and how the checkpoint was chosen."""
    lines = [
        "## Training data",
        "",
        f"Data set `{data['dataset']}` (data.root `{data['root']}`), split `{data['split']}`"
        + (
            f" (test fraction {data['test_fraction']})"
            if data["split"] != "authors"
            else " (the DiffMIC authors' released split)"
        )
        + f", validation fraction {data['val_fraction']} carved from train"
        + (f", stratified subset of {data['subset']} images" if data.get("subset") else "")
        + f", images at {data['image_size']} px, {data['in_chans']} channel(s).",
    ]
    from diffmic.data.sources import find_dataset

    spec = find_dataset(data["dataset"])
    note = spec.split_notes.get(data["split"]) if spec is not None else None
    if note:
        lines.append(note)
    if fit_summary:
        lines.append(
            f"Training: {fit_summary.get('epochs')} epochs, checkpoint selected on "
            f"{fit_summary.get('selected_on')} {fit_summary.get('monitor')} "
            f"(score {_fmt(fit_summary.get('best_score'))})."
        )
    return lines


def _card_test(metrics: dict | None) -> list[str]:
    """The model card's test metrics (test_metrics.json) with their 95 % intervals and the referral."""
    lines: list[str] = []
    if metrics:
        ci = metrics.get("ci") or metrics.get("intervals") or {}
        lines += [
            f"Test split, {metrics.get('num_images', '?')} images, sampler {metrics.get('sampler')} "
            f"{metrics.get('steps')} steps ({metrics.get('checkpoint', '')}).",
            "",
            "| metric | value | 95% interval |",
            "|---|---|---|",
        ]
        for k in ("acc", "balanced_acc", "f1", "kappa", "auroc"):
            if k in metrics:
                lines.append(_metric_line(k, metrics[k], ci.get(k) if isinstance(ci, dict) else None))
        ref = metrics.get("referral")
        if isinstance(ref, dict):
            lines += [
                "",
                f"Referral: {_fmt(ref.get('referred_fraction'))} of test images referred; accuracy on "
                f"the rest {_fmt(ref.get('accuracy_kept'))}, on the referred {_fmt(ref.get('accuracy_referred'))}.",
            ]
    else:
        lines.append(
            "No test_metrics.json in the run folder: this model was not evaluated on a test split "
            "(run `diffmic test --run RUN` before exporting)."
        )
    return lines


def _card_use_and_files(meta: dict) -> list[str]:
    """The model card's ``## Intended use and limits``, ``## Files`` and ``## Reference``."""
    return [
        "",
        "## Intended use and limits",
        "",
        "Research on medical image classification and its uncertainty. **Not a medical device**: it is not "
        "validated for diagnosis or treatment decisions and must not replace a clinician. Predictions are "
        "only meaningful for images like the training data (same modality, acquisition and population); "
        "the referral flag marks low-confidence cases but does not catch every error or out-of-distribution "
        "input. Scores from one data set and split do not transfer to other sites. Check the licence of the "
        "training data (HAM10000: CC BY-NC 4.0, non-commercial) before any use.",
        "",
        "## Files",
        "",
        f"`{WEIGHTS}` (weights, SHA-256 `{meta['weights_sha256']}`), `{CONFIG}` (architecture, preprocessing, "
        "sampler, class names), this card"
        + (", ONNX graphs (see config.json `onnx`)" if meta.get("onnx") else "")
        + ". Load with `diffmic.inference.Predictor.load(folder)`; no Lightning needed.",
        "",
        "## Reference",
        "",
        PAPER,
        "",
    ]


def _pretrained_text(model: dict) -> str:
    p = model.get("pretrained")
    if model.get("encoder_weights") or model.get("dcg_weights"):
        return "local weight files (model.encoder_weights / model.dcg_weights)"
    if p is True:
        return "ImageNet (torchvision/timm)"
    if p:
        return f"local file `{Path(str(p)).name}`"
    return "random initialisation"


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # own, contiguous copies: safetensors refuses tensors that share memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def export_model(
    run: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    out: str | os.PathLike = "",
    onnx: bool = False,
    onnx_batch: int = 1,
) -> Path:
    """Write the portable folder ``out`` from a run (best checkpoint) or a checkpoint file.

    ``out`` must not exist or be empty (nothing is overwritten); the folder is assembled next to it
    and renamed into place at the end, so a failed export leaves nothing behind.
    """
    from safetensors.torch import save_file

    from diffmic.training.checkpoint import load_module, read_checkpoint
    from diffmic.training.run import resolve_checkpoint

    if not run and not ckpt:
        raise ExportError("export needs --run RUN (or --ckpt FILE)")
    out = Path(out)
    if out.is_symlink():  # never write through a link to somewhere else (nor replace the link)
        raise ExportError(
            f"'{out}' is a symbolic link (to '{os.readlink(out)}'); export writes a new folder and never "
            "writes through a link. Choose a new --out folder, or give the link's target itself (nothing was written)"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"'{out}' already exists and is a file; choose a new --out folder (nothing was written)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"'{out}' already exists and is not empty; choose a new --out folder (nothing was written)")
    if run:
        ckpt_path = resolve_checkpoint(Path(run), str(ckpt) if ckpt else None)
    else:
        assert ckpt is not None  # run or ckpt: checked on entry
        ckpt_path = Path(ckpt)
    raw = read_checkpoint(ckpt_path)
    hp = raw["hyper_parameters"]
    module = load_module(ckpt_path)  # EMA weights applied when the run evaluates with them
    model = module.model.eval()
    run_dir = Path(run) if run else ckpt_path.parent.parent
    metrics = _read_json(run_dir / "test_metrics.json")
    fit_summary = _read_json(run_dir / "fit_summary.json")
    calibration = raw.get(
        "diffmic_calibration", raw.get("calibration", hp.get("calibration"))
    )  # training.checkpoint.CALIBRATION_KEY
    train_config = dict(hp["config"])
    arch = dict(model.hparams)
    arch.update(encoder_weights=None, dcg_weights=None, pretrained=None)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # a new folder of our own (never one that exists: nothing of anyone else's is removed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the model folder '{out}': {exc} (nothing was written)") from exc
    try:  # the folder is renamed into place when complete, and removed on any error
        with atomic_path(out, tmp=tmp):
            save_file(_tensors(model), str(tmp / WEIGHTS), metadata={"format": FORMAT, "diffmic_version": __version__})
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "diffmic_version": __version__,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "class_names": list(module.class_names),
                "num_classes": int(module.num_classes),
                "architecture": arch,
                "preprocessing": _preprocessing(module.cfg),
                "sampler": dict(train_config["eval"]),
                "diffusion": dict(train_config["diffusion"]),
                "calibration": calibration,
                "weights": WEIGHTS,
                "weights_sha256": _sha256(tmp / WEIGHTS),
                "ema": bool(module.cfg.train.use_ema and "diffmic_ema" in raw),
                "source": {
                    "checkpoint": str(ckpt_path),
                    "diffmic_version": raw.get("diffmic_version", "unknown"),
                    "epoch": raw.get("epoch"),
                    "global_step": raw.get("global_step"),
                },
                "config": train_config,
            }
            if onnx:
                meta["onnx"] = export_onnx(model, module.cfg, tmp, batch=onnx_batch)
            (tmp / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
            (tmp / CARD).write_text(_model_card(meta, metrics, fit_summary))
            if out.is_symlink():  # appeared while exporting
                raise ExportError(f"'{out}' became a symbolic link while exporting; nothing was written there")
            if out.is_dir():
                out.rmdir()  # empty (checked above; fails if something was written there meanwhile)
    except OSError as exc:
        raise ExportError(
            f"cannot write the model folder '{out}': {exc} (nothing was written; if '{out}' appeared "
            "meanwhile, choose a new --out folder)"
        ) from exc
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); fix or delete it before exporting") from exc
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------------------------
# ONNX


#: the encoder graph's outputs: always ``features``, ``prior``, ``guidance``; with a DCG also the DCG's
#: outputs the predictor reports (the OOD energy score reads ``z_fused``)
ONNX_ENCODER_OUTPUTS: tuple[str, ...] = ("features", "prior", "guidance")
ONNX_DCG_OUTPUTS: tuple[str, ...] = ("z_fused", "saliency", "roi_boxes", "roi_attention")


class _EncoderDCG(nn.Module):
    """``image [B, C_in, H, W] -> (features ρ(x) [B, hidden], prior [B, C], guidance [B, G], ...)``: the
    fused DCG prior (the sampler's mean μ) and the guidance vector the denoiser takes (``Priors.guidance``:
    the fused prior by default, softmax(½(z_g + z_l)) with ``model.prior=zero``, ``[ŷ_g, ŷ_l]`` (G = 2C)
    with ``model.denoiser_input=paper``; zeros for variants without a DCG). With a DCG also its fused
    logits ``z_fused [B, C]``, ``saliency [B, C, h, w]``, ``roi_boxes [B, K, 4]`` (int64) and
    ``roi_attention [B, K]`` (:data:`ONNX_DCG_OUTPUTS`)."""

    def __init__(self, model: DiffMIC) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = self.model.encode(image)
        g = self.model.guide(image)
        pri = self.model.priors(g, image.shape[0], image.device, image.dtype)
        if g is None:
            return feat, pri.fused, pri.guidance
        return feat, pri.fused, pri.guidance, g.z_fused, g.saliency, g.roi_boxes.long(), g.roi_attention


class _DenoiserStep(nn.Module):
    """``(features [B, hidden], y_t [B, C], t [B] int64, guidance [B, G]) -> ε [B, C]``."""

    def __init__(self, model: DiffMIC) -> None:
        super().__init__()
        self.model = model

    def forward(self, feat: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.model.eps(feat, y_t, t, guidance if self.model.uses_guidance else None)


def export_onnx(model: DiffMIC, cfg, folder: str | os.PathLike, batch: int = 1, opset: int = 18) -> dict:
    """Write :data:`ONNX_ENCODER` and :data:`ONNX_STEP` into ``folder`` and return config.json's ``onnx``
    block (each graph's inputs, outputs, SHA-256 and size in bytes). The encoder graph has the fixed
    batch size ``batch`` (the DCG's top-K ROI crops are traced for it; the ONNX backend of the
    predictor runs any number of images in chunks of it); the step graph takes any batch. Needs the
    ``onnx`` extra (onnx, onnxscript)."""
    if not model.uses_diffusion:
        from diffmic.nn.diffmic import DIFFUSION_VARIANTS

        raise ExportError(
            f"ONNX export covers the diffusion variants ({', '.join(DIFFUSION_VARIANTS)}); variant "
            f"'{model.variant}' is a plain classifier: export its classify(x) with torch.onnx.export"
        )
    if not _is_int(batch) or batch < 1:
        raise ExportError(f"the ONNX export batch must be a whole number >= 1, got {batch!r}")
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError("--onnx needs the 'onnx' extra: pip install 'diffmic[onnx]'") from exc
    folder = Path(folder)
    s, c_in, n = cfg.data.image_size, cfg.data.in_chans, model.num_classes
    image = torch.zeros(batch, c_in, s, s)
    model = model.eval().to("cpu")
    enc = _EncoderDCG(model).eval()
    step = _DenoiserStep(model).eval()
    with torch.no_grad():
        outs = enc(image)
        feat, prior, guidance = outs[:3]
        names = ONNX_ENCODER_OUTPUTS + (ONNX_DCG_OUTPUTS if len(outs) > 3 else ())
        args = (feat, prior.clone(), torch.full((batch,), 10, dtype=torch.long), guidance)
        torch.onnx.export(
            enc,
            (image,),
            str(folder / ONNX_ENCODER),
            input_names=["image"],
            output_names=list(names),
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            step,
            args,
            str(folder / ONNX_STEP),
            input_names=["features", "y_t", "t", "guidance"],
            output_names=["eps"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={k: {0: "batch"} for k in ("features", "y_t", "t", "guidance", "eps")},
        )
    g = int(guidance.shape[1])
    return {
        "encoder_dcg": {
            "file": ONNX_ENCODER,
            "sha256": _sha256(folder / ONNX_ENCODER),
            "bytes": (folder / ONNX_ENCODER).stat().st_size,
            "batch": batch,
            "inputs": {"image": [batch, c_in, s, s]},
            "outputs": {name: [int(d) for d in o.shape] for name, o in zip(names, outs)},
            "note": "fixed batch size; the input is the preprocessed image (see preprocessing); prior is the "
            "sampler's mean, guidance what the denoiser step takes; with a DCG also its fused logits z_fused, "
            "saliency maps, ROI boxes (y0, x0, y1, x1, int64) and their attention weights",
        },
        "denoiser_step": {
            "file": ONNX_STEP,
            "sha256": _sha256(folder / ONNX_STEP),
            "bytes": (folder / ONNX_STEP).stat().st_size,
            "inputs": {"features": ["B", int(feat.shape[1])], "y_t": ["B", n], "t": ["B"], "guidance": ["B", g]},
            "outputs": {"eps": ["B", n]},
            "note": "t is int64 in [0, T); run the sampler (config sampler/diffusion) around it",
        },
        "opset": opset,
    }
