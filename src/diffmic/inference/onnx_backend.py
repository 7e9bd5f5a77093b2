"""Serve an exported model folder with ONNX Runtime: ``Predictor.load(folder, backend="onnx")``.

The folder's two graphs (``diffmic export --onnx``; :func:`diffmic.inference.export.export_onnx`)
stand in for the PyTorch network: :class:`OnnxNetwork` has the attributes and methods of
:class:`~diffmic.nn.diffmic.DiffMIC` that :func:`~diffmic.diffusion.reverse.reverse_sample` and
:class:`~diffmic.inference.predictor.Predictor` use (``guide``, ``priors``, ``encode``, ``eps``), so
the sampler, the read-out and the trust layer are the library's own. The network is never built:
neither timm nor torchvision is imported (they cost seconds of start-up), nor the ``onnx`` package
(about 0.6 s to import; the graphs are checked by :func:`check_graph_bytes`, a minimal reader of
the protobuf wire format).

ONNX Runtime runs on the CPU here (``CPUExecutionProvider``), with ``torch.get_num_threads()``
intra-op threads (``OMP_NUM_THREADS`` where set).

The folder is untrusted input, checked as :func:`~diffmic.inference.export.load_model_folder` checks
it (``config.json``'s schema, the training config, the architecture it states), and in addition:
each graph must be the plain file config.json names (no link), of the size and SHA-256 recorded there
(a folder exported before they were recorded is refused: export it again with ``diffmic export
--onnx``), at most :data:`MAX_GRAPH_BYTES`, and hold no tensor whose data lives in an external file
(``data_location = EXTERNAL`` or ``external_data`` entries), so nothing outside the folder is read.
The checked bytes are what ONNX Runtime loads (from memory, not from the path again).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from diffmic.inference.export import (
    CONFIG,
    ONNX_DCG_OUTPUTS,
    ONNX_ENCODER,
    ONNX_ENCODER_OUTPUTS,
    ONNX_STEP,
    ExportError,
    PortableModel,
    _architecture,
    _check_ood,
    _is_hex,
    _is_int,
    _read_meta,
    _refuse,
    folder_config,
)

__all__ = [
    "MAX_GRAPH_BYTES",
    "OnnxGuidance",
    "OnnxNetwork",
    "OnnxPriors",
    "check_graph_bytes",
    "load_onnx_folder",
    "onnx_device",
]

#: the largest graph file read (protobuf's own limit for one message is 2 GiB; a diffmic graph is MBs)
MAX_GRAPH_BYTES = 2 * 2**30 - 1
#: ONNX Runtime's execution provider: the CPU one (the only one this backend uses)
PROVIDER = "CPUExecutionProvider"
#: the device the backend's tensors live on (ONNX Runtime's CPU provider reads and writes host memory)
ORT_DEVICE = torch.device("cpu")
_MAX_NESTING = 64  # graphs inside attributes inside graphs ...; a real model nests a few levels
_REEXPORT = "export it again with `diffmic export --onnx`"


class OnnxGuidance(NamedTuple):
    """The DCG outputs the predictor reports (as :class:`~diffmic.nn.guidance.GuidanceOutput`'s fields)."""

    z_fused: Tensor  #: [B, C] DCG logits ½ (z_g + z_l) (the OOD energy score)
    saliency: Tensor  #: [B, C, h, w]
    roi_boxes: Tensor  #: [B, K, 4] int64 (y0, x0, y1, x1) in input pixels
    roi_attention: Tensor  #: [B, K]


class OnnxPriors(NamedTuple):
    """What :func:`~diffmic.diffusion.reverse.reverse_sample` reads of :class:`~diffmic.nn.diffmic.Priors`."""

    fused: Tensor  #: [B, C] the sampler's mean μ
    guidance: Tensor  #: [B, G] what the denoiser step takes


def onnx_device(device: Any = None) -> torch.device:
    """The predictor's device for the ONNX backend: the CPU (``None`` or a CPU device; anything else
    is refused: ONNX Runtime runs on the CPU here)."""
    if device is None:
        return ORT_DEVICE
    dev = torch.device(device)
    if dev.type != ORT_DEVICE.type:
        raise ExportError(
            f"the ONNX backend runs on the CPU (onnxruntime's {PROVIDER}), not on {dev}; leave the device unset "
            "or use the PyTorch backend (backend='torch') for an accelerator"
        )
    return dev


class OnnxNetwork:
    """The two ONNX graphs of a model folder in the place of :class:`~diffmic.nn.diffmic.DiffMIC`.

    ``guide(x)`` and ``encode(x)`` share one run of the encoder graph per batch ``x`` (remembered for
    the last ``x`` by identity and version counter). The encoder graph has a fixed batch size
    (``batch``): a batch is run in chunks of that size, the last one padded with zero images (the
    networks are per-image independent in eval mode; the padding's outputs are dropped)."""

    uses_diffusion = True
    device = ORT_DEVICE

    def __init__(self, encoder: Any, step: Any, *, variant: str, num_classes: int, uses_dcg: bool) -> None:
        self.variant = variant
        self.num_classes = int(num_classes)
        self.uses_dcg = bool(uses_dcg)
        self.uses_guidance = self.uses_dcg  # a diffusion variant with a DCG takes its guidance
        self._encoder = encoder
        self._step = step
        image = encoder.get_inputs()[0]
        self.batch = int(image.shape[0])
        self._image_shape = tuple(int(d) for d in image.shape[1:])
        self._enc_outputs = [o.name for o in encoder.get_outputs()]
        self._step_inputs = {i.name: i for i in step.get_inputs()}
        self._cache: Optional[tuple[Tensor, int, dict[str, Tensor]]] = None

    # -------------------------------------------------------------- the encoder graph
    def _encoder_outputs(self, x: Tensor) -> dict[str, Tensor]:
        c = self._cache
        if c is not None and c[0] is x and c[1] == x._version:
            return c[2]
        if tuple(x.shape[1:]) != self._image_shape:
            raise ValueError(
                f"the encoder graph takes images of shape {list(self._image_shape)}, got {list(x.shape[1:])}"
            )
        xs = x.detach().to(device=ORT_DEVICE, dtype=torch.float32).contiguous().numpy()
        n, b = xs.shape[0], self.batch
        pad = (-n) % b
        if pad:
            xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), dtype=np.float32)])
        parts = [self._encoder.run(self._enc_outputs, {"image": xs[i : i + b]}) for i in range(0, len(xs), b)]
        out = {
            name: torch.from_numpy(np.concatenate([p[j] for p in parts])[:n]).to(x.device)
            for j, name in enumerate(self._enc_outputs)
        }
        self._cache = (x, x._version, out)
        return out

    def encode(self, x: Tensor) -> Tensor:
        """ρ(x) ``[B, hidden_dim]``."""
        return self._encoder_outputs(x)["features"]

    def guide(self, x: Tensor) -> Optional[OnnxGuidance]:
        """The DCG outputs for ``x`` (``None`` for a variant without a DCG, as ``DiffMIC.guide``)."""
        out = self._encoder_outputs(x)
        if not self.uses_dcg:
            return None
        return OnnxGuidance(*(out[k] for k in ONNX_DCG_OUTPUTS))

    def priors(
        self,
        g: Optional[OnnxGuidance],
        batch_size: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> OnnxPriors:
        """μ and the denoiser's guidance of the batch :meth:`guide` last ran (zeros without a DCG, as
        ``DiffMIC.priors``)."""
        if g is None:
            z = torch.zeros(batch_size, self.num_classes, device=device, dtype=dtype)
            return OnnxPriors(z, z)
        c = self._cache
        if c is None or c[2]["z_fused"] is not g.z_fused:
            raise ValueError("priors(g) takes the guidance that guide(x) of this network returned last")
        fused, guidance = c[2]["prior"], c[2]["guidance"]
        return OnnxPriors(fused.to(device=device, dtype=dtype), guidance.to(device=device, dtype=dtype))

    # -------------------------------------------------------------- the denoiser-step graph
    def eps(self, feat: Tensor, y_t: Tensor, t: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        """ε ``[N, C]`` from ``feat [N, hidden]``, ``y_t [N, C]``, ``t [N]`` and ``guidance [N, G]`` (ignored
        without a DCG, as ``DiffMIC.eps``)."""
        n = y_t.shape[0]

        def arr(v: Tensor, dtype: torch.dtype) -> np.ndarray:
            return v.detach().to(device=ORT_DEVICE, dtype=dtype).contiguous().numpy()

        feed = {
            "features": arr(feat, torch.float32),
            "y_t": arr(y_t, torch.float32),
            "t": arr(t.expand(n) if t.dim() == 0 else t, torch.int64),
        }
        if "guidance" in self._step_inputs:
            if guidance is None or not self.uses_guidance:
                width = int(self._step_inputs["guidance"].shape[1])
                feed["guidance"] = np.zeros((n, width), dtype=np.float32)
            else:
                feed["guidance"] = arr(guidance, torch.float32)
        eps = self._step.run(["eps"], feed)[0]
        return torch.from_numpy(eps).to(device=y_t.device, dtype=y_t.dtype)


# ------------------------------------------------------------------------------------------------
# Checking the graphs


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("a truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


# Which fields of which ONNX message hold messages that can hold a tensor (onnx.proto field numbers):
# ModelProto.graph 7, training_info 20, functions 25; TrainingInfoProto initialization 1, algorithm 2;
# GraphProto node 1, initializer 5, sparse_initializer 15; NodeProto attribute 5; AttributeProto t 5,
# g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23; SparseTensorProto values 1,
# indices 2; FunctionProto node 7, attribute_proto 11.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "function": {7: "node", 11: "attribute"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data (repeated key/value: location, offset, length)
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location (DEFAULT 0, EXTERNAL 1)


def _external_tensor(buf: bytes, start: int, end: int, kind: str, depth: int) -> bool:
    """True when the message ``buf[start:end]`` of type ``kind`` holds (at any depth) a tensor whose
    data is stored outside the file."""
    if depth > _MAX_NESTING:
        raise ValueError(f"messages nested more than {_MAX_NESTING} deep")
    children = _CHILDREN[kind]
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value != 0:
                return True
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                return True
            child = children.get(field)
            if child is not None and _external_tensor(buf, pos, pos + length, child, depth + 1):
                return True
            pos += length
        else:
            raise ValueError(f"wire type {wire} (groups are not used by ONNX)")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
    return False


def check_graph_bytes(data: bytes, path: Path) -> None:
    """Refuse (:class:`ExportError` naming ``path``) an ONNX model whose bytes do not parse as a
    protobuf message, or that holds a tensor stored in an external file (``data_location =
    EXTERNAL`` or ``external_data`` entries) in its graph, subgraphs, node attributes, functions or
    training info: ONNX Runtime would read that file from beside the model or the working folder."""
    try:
        external = _external_tensor(data, 0, len(data), "model", 0)
    except ValueError as exc:
        raise _refuse(path, f"not an ONNX model ({exc})") from exc
    if external:
        raise _refuse(
            path,
            "it refers to tensor data in an external file (ONNX external data); a model folder's graphs must "
            "hold all their tensors, and nothing outside the folder is read",
        )


def _read_graph(folder: Path, cfg_path: Path, block: dict, key: str, name: str) -> tuple[Path, bytes]:
    """The checked bytes of the graph ``config.json`` lists under ``onnx.<key>`` (which must be ``name``)."""
    entry = block.get(key)
    if not isinstance(entry, dict):
        raise _refuse(cfg_path, f"'onnx.{key}' must be a JSON object")
    if entry.get("file") != name:
        raise _refuse(cfg_path, f"'onnx.{key}.file' must be {name!r}, got {entry.get('file')!r}")
    digest, size = entry.get("sha256"), entry.get("bytes")
    if digest is None or size is None:
        raise ExportError(
            f"{cfg_path}: 'onnx.{key}' records no SHA-256 and size of {name} (exported by an older diffmic): the "
            f"graph cannot be checked, so it is not loaded; {_REEXPORT}"
        )
    if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
        raise _refuse(cfg_path, f"'onnx.{key}.sha256' must be 64 hex digits, got {digest!r}")
    if not (_is_int(size) and 0 < size <= MAX_GRAPH_BYTES):
        raise _refuse(cfg_path, f"'onnx.{key}.bytes' must be a whole number in [1, {MAX_GRAPH_BYTES}], got {size!r}")
    path = folder / name
    if path.is_symlink():
        raise _refuse(path, "a symbolic link; a model folder's graphs must be files in the folder")
    if not path.is_file():
        raise ExportError(f"{path}: missing (config.json lists it under 'onnx.{key}'); {_REEXPORT}")
    try:
        actual = path.stat().st_size
        if actual != size:
            raise _refuse(path, f"{actual} bytes, but {CONFIG} records {size} (file changed or truncated)")
        with open(path, "rb") as fh:
            data = fh.read(size + 1)
    except OSError as exc:
        raise ExportError(f"{path} cannot be read: {exc}") from exc
    if len(data) != size:
        raise _refuse(path, f"{len(data)} bytes read, but {CONFIG} records {size} (file changed while reading)")
    if hashlib.sha256(data).hexdigest() != digest.lower():
        raise _refuse(path, f"its SHA-256 differs from {CONFIG}'s 'onnx.{key}.sha256' (file changed)")
    check_graph_bytes(data, path)
    return path, data


def _session(ort: Any, path: Path, data: bytes) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=[PROVIDER])
    except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, ...), re-raised as ours
        raise _refuse(path, f"ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _check_io(path: Path, got: list[str], want: list[str], what: str) -> None:
    if got != want:
        raise _refuse(path, f"its {what} are {got}, expected {want} (the graph does not match {CONFIG})")


def load_onnx_folder(path: str | os.PathLike, eval_overrides: Optional[dict] = None) -> PortableModel:
    """A :class:`PortableModel` whose ``model`` is the folder's ONNX graphs (:class:`OnnxNetwork`), with
    every check of :func:`~diffmic.inference.export.load_model_folder` on ``config.json`` and the checks
    of the graphs in this module's docstring; the PyTorch network is not built. Each problem raises
    :class:`ExportError` naming the file."""
    from diffmic.nn.diffmic import DIFFUSION_VARIANTS, variant_parts  # light: no encoder is built

    folder = Path(path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"'{folder}' is not a diffmic model folder: it needs {CONFIG} (written by `diffmic export`)")
    meta = _read_meta(cfg_path)
    cfg = folder_config(meta, cfg_path, eval_overrides)
    kwargs = _architecture(meta, cfg, cfg_path)
    parts = variant_parts(kwargs["variant"])
    if not parts.diffusion:
        raise ExportError(
            f"{folder}: variant '{kwargs['variant']}' is a plain classifier and has no ONNX graphs (ONNX export covers "
            f"the diffusion variants: {', '.join(DIFFUSION_VARIANTS)}); load it with backend='torch'"
        )
    _check_ood(meta, cfg_path, feature_dim=int(kwargs["hidden_dim"]))
    block = meta.get("onnx")
    if block is None:
        raise ExportError(f"{folder} holds no ONNX graphs ({CONFIG} has no 'onnx'); {_REEXPORT}")
    if not isinstance(block, dict):
        raise _refuse(cfg_path, "'onnx' must be a JSON object")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("the ONNX backend needs onnxruntime: pip install 'diffmic[onnx]'") from exc
    enc_path, enc_data = _read_graph(folder, cfg_path, block, "encoder_dcg", ONNX_ENCODER)
    step_path, step_data = _read_graph(folder, cfg_path, block, "denoiser_step", ONNX_STEP)
    encoder = _session(ort, enc_path, enc_data)
    step = _session(ort, step_path, step_data)
    outputs = list(ONNX_ENCODER_OUTPUTS) + (list(ONNX_DCG_OUTPUTS) if parts.dcg else [])
    _check_io(enc_path, [i.name for i in encoder.get_inputs()], ["image"], "inputs")
    _check_io(enc_path, [o.name for o in encoder.get_outputs()], outputs, "outputs")
    s, c_in = cfg.data.image_size, cfg.data.in_chans
    shape = list(encoder.get_inputs()[0].shape)
    if not (len(shape) == 4 and _is_int(shape[0]) and shape[0] >= 1 and shape[1:] == [c_in, s, s]):
        raise _refuse(enc_path, f"its input 'image' has shape {shape}, expected [batch, {c_in}, {s}, {s}]")
    step_inputs = [i.name for i in step.get_inputs()]
    if step_inputs not in (["features", "y_t", "t", "guidance"], ["features", "y_t", "t"]):
        raise _refuse(step_path, f"its inputs are {step_inputs}, expected ['features', 'y_t', 't', 'guidance']")
    _check_io(step_path, [o.name for o in step.get_outputs()], ["eps"], "outputs")
    net = OnnxNetwork(
        encoder, step, variant=kwargs["variant"], num_classes=len(meta["class_names"]), uses_dcg=parts.dcg
    )
    return PortableModel(net, cfg, meta["class_names"], meta.get("calibration"), {**meta, "backend": "onnx"})
