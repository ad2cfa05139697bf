"""The hard synthetic radiograph set and the one scoring every benchmark model goes through.

Used by ``train_synthetic.py --hard`` (bundle vs the smp peer, TTA, checkpoint averaging) and ``ablation.py``
(the patent's parts, fold ensembles). Not a library: benchmark plumbing, run by hand.

* :func:`make_hard_data`: ``pneumoseg synth --hard`` training + validation images from one seed, held-out test
  images from another seed (so no test image shares a patient, a seed stream or anything else with training),
  one manifest (``training`` / ``validation`` / ``test``, plus cross-validation splits ``cv_train_i`` /
  ``cv_val_i`` over training + validation when ``folds`` > 1);
* :func:`train_bundle`: ``python -m monai.bundle run training`` with the bundle's own configs and overrides;
* :func:`train_peer`: the same recipe (transforms, optimiser, warm-up + cosine schedule, gradient clipping, fused
  loss and weights, best-validation-epoch selection) read from ``train.json``, for a network the bundle cannot
  build (the smp peer);
* :func:`score`: predictions on validation and test, post-processing searched on validation
  (:class:`pneumoseg.postprocessing.PostprocessingSearch`), test metrics with the chosen values: SIIM Dice,
  positive-only Dice, image AUC, sensitivity / specificity of the final masks (a non-empty mask calls the image
  positive) and of the image gate alone (``p_cls >= t_cls``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoseg.runtime import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
DATA = REPO / "bench_out" / "hard_data"
"""The hard set every benchmark shares (seed 0, 256 px, 3 cross-validation folds)."""
CPU_BF16 = cpu_has_native_bf16()
"""bf16 autocast for training and scoring where the CPU has it natively (emulated bf16 is several times slower)."""


# ============================================================================================== data


def make_hard_data(
    out: Path, train_val: int = 352, test: int = 100, size: int = 256, seed: int = 0, workers: int = 2, folds: int = 0
) -> Path:
    """Write the hard set under ``out`` (``trainval/``, ``test/``, ``manifest.json``); returns the manifest."""
    from pneumoseg.data.manifest import build_siim_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return manifest_path
    shutil.rmtree(out, ignore_errors=True)
    print(synthesize(out / "trainval", train_val, size, ct=0, seed=seed, workers=workers, hard=True), flush=True)
    print(synthesize(out / "test", test, size, ct=0, seed=seed + 1000, workers=workers, hard=True), flush=True)
    built = {}
    for name, val_fraction, n_folds in (("trainval", 52 / 352, max(folds, 0)), ("test", 0.0, 0)):
        built[name], _ = build_siim_manifest(
            out / name / "dicom-images-train", out / name / "train-rle.csv", out, salt="hard-benchmark",
            val_fraction=val_fraction, test_fraction=0.0, folds=n_folds, seed=seed, progress=False,
        )  # fmt: skip
    manifest = {k: v for k, v in built["trainval"].items() if not k.startswith("fold_")}
    manifest["test"] = built["test"]["training"] + built["test"]["validation"] + built["test"]["test"]
    pool = built["trainval"]["training"] + built["trainval"]["validation"]
    for i in range(folds if folds > 1 else 0):
        held = {e["image"] for e in built["trainval"][f"fold_{i}"]}
        manifest[f"cv_val_{i}"] = [e for e in pool if e["image"] in held]
        manifest[f"cv_train_{i}"] = [e for e in pool if e["image"] not in held]
    write_manifest(manifest, manifest_path)
    return manifest_path


def split_entries(manifest_path: Path, split: str) -> list[dict[str, Any]]:
    """A manifest split with absolute image paths."""
    from pneumoseg.data.manifest import manifest_base_dir

    root = manifest_base_dir(manifest_path)
    entries = json.loads(manifest_path.read_text())[split]
    return [{**e, **{k: str(root / e[k]) for k in ("image", "label") if k in e}} for e in entries]


# ========================================================================================== training


def bundle_defaults() -> dict[str, Any]:
    """The training recipe ``train.json`` sets (what the peer is trained with too)."""
    config = json.loads((BUNDLE / "configs" / "train.json").read_text())
    loss = config["loss"]
    return {
        "learning_rate": float(config["learning_rate"]),
        "weight_decay": float(config["weight_decay"]),
        "warmup_epochs": int(config["warmup_epochs"]),
        "grad_clip_norm": float(config["grad_clip_norm"]),
        "batch_size": int(config["batch_size"]),
        "seg_weight": float(loss.get("seg_weight", 1.0)),
        "cls_weight": float(loss.get("cls_weight", 0.5)),
    }


def train_bundle(
    bundle: Path,
    manifest: Path,
    epochs: int,
    image_size: int,
    seed: int = 0,
    overrides: Sequence[str] = (),
    workers: int = 2,
    cpu_bf16: bool = CPU_BF16,
    average_top_k: int = 0,
    train_split: str = "training",
    val_split: str = "validation",
    overlays: Sequence[str] = (),
) -> float:
    """Train a fresh copy of the bundle's configs in ``bundle`` through ``monai.bundle run training``;
    returns the wall time in seconds. ``average_top_k`` > 0 adds the ``average_top_k.json`` overlay;
    ``overlays``: more configs on top of ``train.json`` (e.g. ``ct.json``)."""
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    configs = [str(bundle / "configs" / name) for name in ("train.json", *overlays)]
    if average_top_k:
        configs.append(str(bundle / "configs" / "average_top_k.json"))
        overrides = [*overrides, "--average_top_k", str(average_top_k)]
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", str(bundle / "configs/metadata.json"),
        "--config_file", str(configs), "--bundle_root", str(bundle), "--datalist", str(manifest),
        "--train_split", train_split, "--val_split", val_split, "--num_epochs", str(epochs),
        "--image_size", str(image_size), "--cache_rate", "1.0", "--early_stop_patience", str(epochs),
        "--num_workers", str(workers), "--seed", str(seed), "--cpu_bf16", str(bool(cpu_bf16)), *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    log = bundle / "train.log"
    with log.open("w") as f:
        result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.stdout.write("".join(log.read_text().splitlines(keepends=True)[-30:]))
        raise SystemExit(f"training failed ({result.returncode}); log: {log}")
    return time.perf_counter() - start


def recipe_optimisation(
    network: torch.nn.Module, recipe: dict[str, Any], steps_per_epoch: int, epochs: int
) -> tuple[Any, torch.optim.Optimizer, Any]:
    """The fused loss, AdamW and the warm-up + cosine schedule of ``train.json`` (``bundle_defaults()``), for a
    network trained outside the bundle's engines."""
    from monai.optimizers import WarmupCosineSchedule

    from pneumoseg.losses import FusedMultiTaskLoss

    loss = FusedMultiTaskLoss(seg_weight=recipe["seg_weight"], cls_weight=recipe["cls_weight"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    schedule = WarmupCosineSchedule(optimizer, recipe["warmup_epochs"] * steps_per_epoch, epochs * steps_per_epoch)
    return loss, optimizer, schedule


def train_one_epoch(
    network: torch.nn.Module,
    loader: Any,
    loss: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    grad_clip_norm: float,
    cpu_bf16: bool = CPU_BF16,
) -> Any:
    """One epoch of the bundle's recipe outside its engines (bf16 autocast, fused loss, gradient clipping, a
    schedule step per batch, a step with non-finite gradients skipped as ``GradientClipHandler`` does);
    returns the last batch's loss terms."""
    network.train()
    skipped = 0
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out = network(batch["image"])
        terms = loss(out[0], out[1], batch["label"].float())
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        norm = torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip_norm)
        if torch.isfinite(norm):
            optimizer.step()
        else:
            skipped += 1
        schedule.step()
    if skipped:
        print(f"  {skipped} of {len(loader)} steps skipped: non-finite gradients", flush=True)
    return terms


def train_peer(
    network: torch.nn.Module,
    manifest: Path,
    epochs: int,
    image_size: int,
    seed: int = 0,
    workers: int = 2,
    cpu_bf16: bool = CPU_BF16,
    recipe: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], float]:
    """Train ``network`` with the bundle's recipe; returns (best validation epoch's state dict, per-epoch
    validation SIIM Dice at plain 0.5 thresholding, wall time in seconds)."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, SelectItemsd
    from monai.utils import set_determinism

    from pneumoseg.data.transforms import radiograph_train_transforms

    start = time.perf_counter()
    r = {**bundle_defaults(), **(recipe or {})}
    set_determinism(seed=seed)
    chain = Compose([radiograph_train_transforms(image_size), SelectItemsd(keys=["image", "label"])])
    train_ds = CacheDataset(split_entries(manifest, "training"), chain, num_workers=workers, progress=False)
    loader = DataLoader(train_ds, batch_size=r["batch_size"], shuffle=True, drop_last=True, num_workers=workers)
    val_images, val_labels = load_images(manifest, "validation", image_size)
    loss, optimizer, schedule = recipe_optimisation(network, r, len(loader), epochs)
    best, best_score, history = None, -1.0, []
    for epoch in range(1, epochs + 1):
        set_determinism(seed=(seed * 1_000_003 + epoch) % 2**31)
        terms = train_one_epoch(network, loader, loss, optimizer, schedule, r["grad_clip_norm"], cpu_bf16)
        seg, cls = predict(network, val_images, cpu_bf16=cpu_bf16)
        dice = float(siim_dice(seg > 0.5, val_labels).mean())
        history.append({"epoch": epoch, "val_siim_dice": dice, "loss": float(terms.total)})
        print(f"  peer epoch {epoch}/{epochs}: validation SIIM Dice {dice:.4f}", flush=True)
        if dice > best_score + 1e-4:  # the bundle's CheckpointSaver keeps the best key metric the same way
            best_score, best = dice, copy.deepcopy(network.state_dict())
    return best, history, time.perf_counter() - start


# =========================================================================================== scoring


def load_images(manifest: Path, split: str, image_size: int, record: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [N, 1, S, S]`` and ``labels [N, 1, S, S]`` (bool) of a split through the validation chain
    (the record's when given, else the defaults at ``image_size``)."""
    from pneumoseg.data.transforms import radiograph_validation_transforms, record_validation_transforms

    if record is not None:
        chain = record_validation_transforms(record, "radiograph")
    else:
        chain = radiograph_validation_transforms(image_size)
    items = [chain(e) for e in split_entries(manifest, split)]
    images = torch.stack([torch.as_tensor(i["image"]).float() for i in items])
    labels = torch.stack([torch.as_tensor(i["label"]) > 0.5 for i in items])
    return images, labels


@torch.inference_mode()
def predict(
    network: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int = 8, cpu_bf16: bool = CPU_BF16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seg_prob [N, 1, S, S], cls_prob [N])`` in eval mode (bf16 autocast as in training, outputs fp32)."""
    was_training = getattr(network, "training", False)
    if hasattr(network, "eval"):
        network.eval()
    segs, clss = [], []
    for i in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out = network(images[i : i + batch])
        segs.append(torch.sigmoid(out[0].float()))
        clss.append(torch.sigmoid(out[1].float()).reshape(-1))
    if was_training:
        network.train()
    return torch.cat(segs), torch.cat(clss)


def siim_dice(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image Dice ``[N]``, empty on empty = 1."""
    p, t = pred.flatten(1).bool(), truth.flatten(1).bool()
    denominator = (p.sum(1) + t.sum(1)).float()
    overlap = 2 * (p & t).sum(1).float() / denominator.clamp_min(1)
    return torch.where(denominator > 0, overlap, torch.ones_like(denominator))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@dataclass
class Predictions:
    seg: torch.Tensor  # [N, 1, S, S] probabilities
    cls: torch.Tensor  # [N]
    labels: torch.Tensor  # [N, 1, S, S] bool


def score(validation: Predictions, test: Predictions) -> dict[str, Any]:
    """Post-processing searched on ``validation``, applied to ``test``: the test metrics and the values."""
    from pneumoseg.postprocessing import DualOutputPostprocess, PostprocessingSearch

    search = PostprocessingSearch()
    search.update(validation.seg, validation.cls[:, None], validation.labels.float())
    params, val_dice, _ = search.search()
    post = DualOutputPostprocess(params.t_cls, params.top, params.min_area, params.bottom)
    masks = torch.stack([post(s, c) for s, c in zip(test.seg, test.cls)]) > 0.5
    dice = siim_dice(masks, test.labels)
    positive = test.labels.flatten(1).any(1)
    called = masks.flatten(1).any(1)
    gate = test.cls >= params.t_cls
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return {
        "siim_dice": float(dice.mean()),
        "siim_dice_positive": float(dice[positive].mean()),
        "auc": auc(test.cls.numpy(), positive.numpy()),
        "sensitivity": float((called & positive).sum()) / max(n_pos, 1),
        "specificity": float((~called & ~positive).sum()) / max(n_neg, 1),
        "gate_sensitivity": float((gate & positive).sum()) / max(n_pos, 1),
        "gate_specificity": float((~gate & ~positive).sum()) / max(n_neg, 1),
        "plain_siim_dice": float(siim_dice(test.seg > 0.5, test.labels).mean()),
        "validation_siim_dice_tuned": val_dice,
        "postprocessing": {
            "t_cls": params.t_cls,
            "top": params.top,
            "min_area": params.min_area,
            "bottom": params.bottom,
        },  # fmt: skip
        "test_images": len(dice),
        "test_positive": n_pos,
    }


def score_network(
    network: Callable[[torch.Tensor], Any],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cpu_bf16: bool = CPU_BF16,
) -> dict[str, Any]:
    """:func:`score` of a network on ``data`` (``{"validation": (images, labels), "test": ...}``)."""
    preds = {split: Predictions(*predict(network, images, cpu_bf16=cpu_bf16), labels)
             for split, (images, labels) in data.items()}  # fmt: skip
    return score(preds["validation"], preds["test"])


def read_history(bundle: Path) -> list[dict[str, Any]]:
    path = bundle / "eval" / "metrics_history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def lock_note() -> str:
    return "" if os.environ.get("OMP_WAIT_POLICY") else " (set OMP_WAIT_POLICY=PASSIVE on a shared machine)"
