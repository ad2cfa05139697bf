"""Hard CT phantoms, the 2D slice model (the bundle's ``ct.json``) and the same network in 3D, scored per volume.

Used by ``train_synthetic.py --ct``. Not a library: benchmark plumbing, run by hand.

* :func:`make_ct_data`: ``pneumoseg synth --hard`` CT volumes (NIfTI) for training + validation from one seed,
  test volumes from another; one manifest;
* the 2D model: ``train.json + ct.json`` through ``monai.bundle`` (axial slices, validation on volumes slice by
  slice); scored with :class:`DualOutputSliceInferer` (the volume's image probability = max over its slices),
  exactly as ``pneumoseg infer`` runs CT;
* the 3D model: ``SCSEUNet(spatial_dims=3)`` trained here with the bundle's recipe (``hard_set.bundle_defaults``)
  on whole volumes (left-right flips as augmentation), best validation epoch kept;
* :func:`score_volumes`: post-processing searched on validation volumes, then per-volume Dice (empty on empty =
  1), positive-only Dice, detection AUC, sensitivity / specificity and the absolute volume error (mL) of the
  predicted pneumothorax on the test volumes.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import hard_set
import numpy as np
import torch

CT_DATA = hard_set.REPO / "bench_out" / "hard_ct_data"


def make_ct_data(
    out: Path = CT_DATA, train_val: int = 40, test: int = 16, size: int = 64, slices: int = 64, seed: int = 0
) -> Path:
    """Hard CT volumes (NIfTI) under ``out``; returns the manifest (training / validation / test)."""
    from pneumoseg.data.manifest import build_nifti_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return manifest_path
    shutil.rmtree(out, ignore_errors=True)
    for name, n, s in (("trainval", train_val, seed), ("test", test, seed + 1000)):
        print(synthesize(out / name, 0, ct=n, ct_size=size, ct_slices=slices, seed=s, workers=2, hard=True))
    built = {}
    for name, val_fraction in (("trainval", 0.2), ("test", 0.0)):
        nifti = out / name / "ct-nifti"
        built[name], _ = build_nifti_manifest(nifti / "images", nifti / "labels", out, salt="hard-ct", folds=0,
                                              val_fraction=val_fraction, test_fraction=0.0, seed=seed,
                                              progress=False)  # fmt: skip
    manifest = dict(built["trainval"])
    manifest["test"] = built["test"]["training"] + built["test"]["validation"] + built["test"]["test"]
    write_manifest(manifest, manifest_path)
    return manifest_path


def load_volumes(manifest: Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``images [N, 1, S, S, K]``, ``labels [N, 1, S, S, K]`` (bool) through the CT validation chain, and each
    model-grid voxel's volume in mL ``[N]``."""
    import nibabel as nib

    from pneumoseg.data.transforms import ct_validation_transforms

    chain = ct_validation_transforms(image_size)
    images, labels, voxel_ml = [], [], []
    for entry in hard_set.split_entries(manifest, split):
        item = chain(entry)
        images.append(torch.as_tensor(item["image"]).float())
        labels.append(torch.as_tensor(item["label"]) > 0.5)
        header = nib.load(entry["image"])
        in_plane = np.prod(header.shape[:2]) / (image_size * image_size)
        voxel_ml.append(float(abs(np.linalg.det(header.affine[:3, :3]))) * in_plane / 1000.0)
    return torch.stack(images), torch.stack(labels), torch.tensor(voxel_ml)


def slice_inferer() -> Any:
    try:  # the engine package of the rebuilt training house, else the module it came from
        from pneumoseg.engine.inferers import DualOutputSliceInferer  # type: ignore[import-not-found]
    except ImportError:
        from pneumoseg.engine.inferers import DualOutputSliceInferer
    return DualOutputSliceInferer(roi_size=(-1, -1), sw_batch_size=16)


@torch.inference_mode()
def predict_volumes(
    network: torch.nn.Module, images: torch.Tensor, two_d: bool, cpu_bf16: bool = hard_set.CPU_BF16
) -> tuple:
    """``(seg_prob [N, 1, S, S, K], cls_prob [N])``: a 2D network slice by slice, a 3D one per volume."""
    network.eval()
    inferer = slice_inferer() if two_d else None
    segs, clss = [], []
    for volume in images:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out = inferer(volume[None], network) if two_d else network(volume[None])
        segs.append(torch.sigmoid(out[0].float())[0])
        clss.append(float(torch.sigmoid(out[1].float()).reshape(-1)[0]))
    return torch.stack(segs), torch.tensor(clss)


def score_volumes(network: torch.nn.Module, data: dict[str, tuple], two_d: bool) -> dict[str, Any]:
    """:func:`hard_set.score` per volume, plus the mean absolute volume error (mL) on the test volumes."""
    from pneumoseg.postprocessing import DualOutputPostprocess

    preds = {}
    for split, (images, labels, _) in data.items():
        seg, cls = predict_volumes(network, images, two_d)
        preds[split] = hard_set.Predictions(seg, cls, labels)
    scored = hard_set.score(preds["validation"], preds["test"])
    pp = scored["postprocessing"]
    post = DualOutputPostprocess(pp["t_cls"], pp["top"], pp["min_area"], pp["bottom"])
    test = preds["test"]
    voxel_ml = data["test"][2]
    predicted = torch.stack([post(s, c) > 0.5 for s, c in zip(test.seg, test.cls)]).flatten(1).sum(1) * voxel_ml
    truth = test.labels.flatten(1).sum(1) * voxel_ml
    positive = truth > 0
    scored["volume_error_ml"] = float((predicted - truth).abs().mean())
    scored["volume_error_ml_positive"] = float((predicted - truth)[positive].abs().mean())
    scored["truth_volume_ml_positive"] = float(truth[positive].mean())
    return scored


def train_3d(
    manifest: Path,
    epochs: int,
    image_size: int,
    seed: int = 0,
    batch_size: int = 2,
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    cpu_bf16: bool = False,
) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """``SCSEUNet(spatial_dims=3)`` on whole volumes with the bundle's recipe; the best validation epoch's
    network, the per-epoch validation Dice and the wall time.

    fp32 by default: torch 2.13's CPU bf16 ``conv3d`` weight gradient is garbage (1e34 or NaN) for 512 channels
    at 2x2x2, which is the last encoder stage of a 64^3 volume; in bf16 every step was non-finite."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, RandFlipd, SelectItemsd
    from monai.utils import set_determinism

    from pneumoseg.data.transforms import ct_validation_transforms
    from pneumoseg.networks import SCSEUNet

    start = time.perf_counter()
    r = hard_set.bundle_defaults()
    set_determinism(seed=seed)
    entries = hard_set.split_entries(manifest, "training")
    chain = Compose([ct_validation_transforms(image_size), RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                     SelectItemsd(keys=["image", "label"])])  # fmt: skip
    loader = DataLoader(
        CacheDataset(entries, chain, progress=False), batch_size=batch_size, shuffle=True, drop_last=True
    )
    val = load_volumes(manifest, "validation", image_size)
    network = SCSEUNet(spatial_dims=3, decoder_channels=decoder_channels)
    loss, optimizer, schedule = hard_set.recipe_optimisation(network, r, len(loader), epochs)
    best, best_score, history = None, -1.0, []
    for epoch in range(1, epochs + 1):
        set_determinism(seed=(seed * 1_000_003 + epoch) % 2**31)
        terms = hard_set.train_one_epoch(network, loader, loss, optimizer, schedule, r["grad_clip_norm"], cpu_bf16)
        seg, _ = predict_volumes(network, val[0], two_d=False, cpu_bf16=cpu_bf16)
        dice = float(hard_set.siim_dice(seg > 0.5, val[1]).mean())
        history.append({"epoch": epoch, "val_dice": dice, "loss": float(terms.total)})
        print(
            f"  3D epoch {epoch}/{epochs}: validation Dice {dice:.4f} ({time.perf_counter() - start:.0f} s)", flush=True
        )
        if dice > best_score + 1e-4:
            best_score, best = dice, copy.deepcopy(network.state_dict())
    network.load_state_dict(best)
    return network, history, time.perf_counter() - start


def write_results(path: Path, key: str, value: Any) -> dict[str, Any]:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results
