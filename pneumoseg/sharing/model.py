"""Run an exported network without its training code: ONNX Runtime (checked first), TorchScript on trust only.

``ExportedModel.load("bundle/models/model.onnx")`` is an ``nn.Module`` returning
:class:`pneumoseg.networks.SCSEUNetOutput` ``(seg, cls)`` logits, like ``SCSEUNet``, so the batch-inference
runner takes it as its ``network``.

- **ONNX** is data to ONNX Runtime, but a tensor may keep its values in an *external file* named by a path
  that ONNX Runtime resolves (relative to the working folder when the model is loaded from bytes). Before a
  session is made, :func:`onnx_problems` checks every tensor of the model (initializers, sparse
  initializers, node attributes of every kind, subgraphs of ``If`` / ``Loop`` / ``Scan`` recursively) and
  refuses external data, custom operator domains, model-local functions and training graphs. It needs the
  ``onnx`` package: without it the check fails (it is never skipped).
- **TorchScript** is code: ``torch.jit.load`` runs what the file holds (a ``__setstate__`` runs at load time
  and may write files). It is loaded only with ``trust=True`` (``--trust`` on the command line), for files of
  senders you trust; received bundles never carry it.

The ONNX graph is traced at one input size, which freezes the network's "pad to a multiple of 64" branch;
this loader pads (centred, as ``SCSEUNet`` does) and crops back itself, so both formats accept any size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.networks import TOTAL_STRIDE, SCSEUNetOutput

__all__ = ["ExportedModel", "ONNX_MISSING", "MAX_MODEL_BYTES", "onnx_problems"]

ONNX_MISSING = "ONNX support needs onnx and onnxruntime: pip install 'pneumoseg[onnx]'"
MAX_MODEL_BYTES = 2 * 1024**3
_DEFAULT_DOMAINS = ("", "ai.onnx")


def onnx_problems(data: bytes) -> list[str]:
    """Why the ONNX model ``data`` must not be loaded (empty: it may). ``ImportError`` without ``onnx``."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"{ONNX_MISSING} (without it an ONNX model cannot be checked, so it is refused)") from err
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)  # protobuf only: nothing is resolved or read besides these bytes
    except Exception as err:  # google.protobuf.message.DecodeError, RecursionError
        return [f"not an ONNX model ({type(err).__name__})"]
    problems: list[str] = []

    def tensor(t: Any, where: str) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            location = next((e.value for e in t.external_data if e.key == "location"), "?")
            problems.append(f"{where}: tensor {t.name!r} keeps its data in an external file ({location!r})")

    def sparse(s: Any, where: str) -> None:
        tensor(s.values, where)
        tensor(s.indices, where)

    def graph(g: Any, where: str) -> None:
        for t in g.initializer:
            tensor(t, f"{where} initializer")
        for s in g.sparse_initializer:
            sparse(s, f"{where} sparse initializer")
        for n in g.node:
            node(n, f"{where} node {n.name or n.op_type!r}")

    def node(n: Any, where: str) -> None:
        if n.domain not in _DEFAULT_DOMAINS:
            problems.append(f"{where}: operator of the custom domain {n.domain!r}")
        for a in n.attribute:
            at = f"{where} attribute {a.name!r}"
            if a.HasField("t"):
                tensor(a.t, at)
            for t in a.tensors:
                tensor(t, at)
            if a.HasField("sparse_tensor"):
                sparse(a.sparse_tensor, at)
            for s in a.sparse_tensors:
                sparse(s, at)
            if a.HasField("g"):
                graph(a.g, f"{at} subgraph")
            for g in a.graphs:
                graph(g, f"{at} subgraph")

    try:
        graph(model.graph, "graph")
        for f in model.functions:
            problems.append(f"model-local function {f.name!r} (not produced by the exporter)")
            for n in f.node:
                node(n, f"function {f.name!r} node {n.name or n.op_type!r}")
        if len(model.training_info):
            problems.append("training graphs (not produced by the exporter)")
    except RecursionError:
        return ["subgraphs nested too deeply"]
    problems += [
        f"opset of the custom domain {o.domain!r}" for o in model.opset_import if o.domain not in _DEFAULT_DOMAINS
    ]
    if problems:
        return problems[:20]
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # onnx.checker.ValidationError and friends
        return [f"onnx.checker: {str(err).splitlines()[0][:200]}"]

    def dims(value: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs, outputs = [dims(v) for v in model.graph.input], [dims(v) for v in model.graph.output]
    if len(inputs) != 1 or len(inputs[0]) != 4 or inputs[0][1] != 1:
        problems.append(f"inputs {inputs}: expected one [batch, 1, H, W]")
    if len(outputs) != 2 or len(outputs[0]) != 4 or len(outputs[1]) != 2:
        problems.append(f"outputs {outputs}: expected seg [batch, 1, H, W] and cls [batch, 1]")
    return problems


def _centre_pads(spatial: list[int], stride: int = TOTAL_STRIDE) -> list[int]:
    """``F.pad`` amounts (last dim first) to the next multiple of ``stride``, as ``SCSEUNet._padding``."""
    pads: list[int] = []
    for size in spatial[::-1]:
        extra = (stride - size % stride) % stride
        pads += [extra // 2, extra - extra // 2]
    return pads


class ExportedModel(nn.Module):
    """An exported SCSEUNet: ``forward(x [B, C, *S]) -> SCSEUNetOutput(seg [B, out, *S], cls [B, 1])`` logits.

    Use :meth:`load`. ``kind`` is ``"torchscript"`` or ``"onnx"``; ``sha256`` identifies the file (for
    output fingerprints: an ONNX session has no ``state_dict``).
    """

    def __init__(self, kind: str, path: str, sha256: str, module: nn.Module | None = None, session=None) -> None:
        super().__init__()
        self.kind = kind
        self.path = path
        self.sha256 = sha256
        self.module = module
        self.session = session
        self.register_buffer("fingerprint", torch.tensor(list(bytes.fromhex(sha256)), dtype=torch.uint8))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        trust: bool = False,
    ) -> ExportedModel:
        """Load ``.onnx`` (checked by :func:`onnx_problems`, then ONNX Runtime, CPU provider) or, with
        ``trust=True`` only, TorchScript (``torch.jit.load``: code, see the module docstring).

        Raises ``ValueError`` (refused or unreadable), ``ImportError`` (ONNX without onnx / onnxruntime),
        ``FileNotFoundError``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_MODEL_BYTES} allowed")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if path.suffix.lower() == ".onnx":
            if not trust:
                problems = onnx_problems(data)
                if problems:
                    raise ValueError(f"{path}: refused: {'; '.join(problems[:3])}")
            try:
                import onnxruntime as ort
            except ImportError as err:
                raise ImportError(f"{path}: {ONNX_MISSING}") from err
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            outputs = [o.name for o in session.get_outputs()]
            if len(outputs) != 2:
                raise ValueError(f"{path}: expected 2 outputs (seg, cls), found {outputs}")
            return cls("onnx", str(path), sha, session=session)
        if not trust:
            raise ValueError(
                f"{path}: refused: TorchScript is code (torch.jit.load runs what the file holds, file writes "
                "included). Use the bundle's weights (--bundle) or its ONNX model; load TorchScript only from a "
                "sender you trust, with --trust"
            )
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as err:
            raise ValueError(f"{path}: not a TorchScript file ({str(err).splitlines()[0][:200]})") from None
        return cls("torchscript", str(path), sha, module=module.eval()).to(device)

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        if self.module is not None:
            out = self.module(x)
            return SCSEUNetOutput(out[0], out[1])
        spatial = list(x.shape[2:])
        pads = _centre_pads(spatial)
        padded = F.pad(x, pads) if any(pads) else x
        array = padded.detach().to("cpu", torch.float32).contiguous().numpy()
        name = self.session.get_inputs()[0].name
        seg, cls_ = self.session.run(None, {name: np.ascontiguousarray(array)})
        seg_t = torch.from_numpy(seg).to(x.device)
        for d in range(len(spatial)):  # crop back (pads are last-dim first)
            seg_t = seg_t.narrow(2 + d, pads[2 * (len(spatial) - 1 - d)], spatial[d])
        return SCSEUNetOutput(seg_t, torch.from_numpy(cls_).to(x.device).reshape(x.shape[0], -1))
