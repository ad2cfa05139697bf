"""Run a received bundle's exported network without its training code: TorchScript or ONNX Runtime.

``ExportedModel.load("bundle/models/model.ts")`` (or ``model.onnx``) is an ``nn.Module`` returning
:class:`pneumoseg.networks.SCSEUNetOutput` ``(seg, cls)`` logits, like ``SCSEUNet``, so the batch-inference
runner takes it as its ``network``::

    BatchInferenceRunner(..., network=ExportedModel.load(bundle / "models/model.ts"))

The ONNX graph is traced at one input size, which freezes the network's "pad to a multiple of 64" branch;
this loader pads (centred, as ``SCSEUNet`` does) and crops back itself, so both formats accept any size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.networks import TOTAL_STRIDE, SCSEUNetOutput

__all__ = ["ExportedModel", "ONNX_MISSING"]

ONNX_MISSING = "ONNX support needs onnx and onnxruntime: pip install 'pneumoseg[onnx]'"


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
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None
    ) -> ExportedModel:
        """Load ``.ts`` / ``.pt`` TorchScript (``torch.jit.load``) or ``.onnx`` (ONNX Runtime, CPU provider).

        Only load files of a bundle that passed ``pneumoseg bundle verify``: TorchScript is code.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if path.suffix == ".onnx":
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
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as err:
            raise ValueError(f"{path}: not a TorchScript file ({err})") from err
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
