"""Site validation of a received bundle: ``pneumoseg bundle evaluate --bundle DIR --manifest M.json``.

Runs the received model on one split of a local manifest with what its record says (no config of the bundle
is read): the network from ``models/model_record.json`` with the weights of ``models/model.pt`` (weights
only; default), or ``models/model.onnx`` through ONNX Runtime (``--model onnx``, checked first), or
TorchScript (``--model torchscript``, only with ``--trust``: it is code); the record's radiograph input size
and intensity percentiles, through the project's own validation chain; the record's post-processing and
operating threshold. It writes to the report folder:

- ``site_validation.json``: SIIM Dice (mean per image, empty on empty = 1), Dice on positive images, image-level
  ROC-AUC, sensitivity / specificity at the sender's ``operating_threshold`` and at a locally re-tuned
  threshold, calibration bins and expected calibration error (ECE), the sender's reported metrics;
- ``site_validation.md``: the same for people;
- ``calibration.png``: reliability diagram of the image-level probability.

The local threshold maximises Youden's J (sensitivity + specificity - 1): it depends on the two rates that are
reported and not on the local prevalence (max-F1 would). It is tuned on the evaluated images themselves, so
its rates are optimistic; tune on one local split (``--split validation``) and confirm on another.
Only aggregates are written, no per-image rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate_site", "rates_at", "youden_threshold", "calibration_bins"]


def rates_at(prob: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity / specificity of calling ``prob`` at or above ``threshold`` positive (pneumoseg's one
    convention, :func:`pneumoseg.postprocessing.at_or_above`: as the evaluator's ``pred_label``)."""
    from pneumoseg.postprocessing import at_or_above

    pred = at_or_above(prob, threshold)
    tp, fn = int((pred & truth).sum()), int((~pred & truth).sum())
    tn, fp = int((~pred & ~truth).sum()), int((pred & ~truth).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def youden_threshold(prob: np.ndarray, truth: np.ndarray) -> float | None:
    """The observed probability maximising sensitivity + specificity - 1 (None without both classes)."""
    if truth.all() or not truth.any():
        return None
    best, best_j = None, -math.inf
    for t in np.unique(prob):
        r = rates_at(prob, truth, float(t))
        j = r["sensitivity"] + r["specificity"] - 1
        if j > best_j:
            best, best_j = float(t), j
    return best


def calibration_bins(prob: np.ndarray, truth: np.ndarray, bins: int = 10) -> tuple[list[dict[str, Any]], float]:
    """Equal-width bins of the predicted probability: count, mean prediction, observed positive fraction; ECE."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        mean_pred = float(prob[sel].mean()) if n else None
        observed = float(truth[sel].mean()) if n else None
        if n:
            ece += n / len(prob) * abs(mean_pred - observed)
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": n,
                "mean_predicted": mean_pred,
                "observed": observed,
            }
        )
    return rows, float(ece)


def _plot_calibration(rows: list[dict[str, Any]], ece: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    used = [r for r in rows if r["count"]]
    top.plot([r["mean_predicted"] for r in used], [r["observed"] for r in used], "o-", label="this site")
    top.set_ylabel("observed fraction with pneumothorax")
    top.set_title(f"{title}\nECE {ece:.3f}", fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    centres = [(r["low"] + r["high"]) / 2 for r in rows]
    bottom.bar(centres, [r["count"] for r in rows], width=1 / len(rows) * 0.9, color="tab:blue")
    bottom.set_xlabel("predicted image probability")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


MODELS = ("state_dict", "onnx", "torchscript")
"""What ``--model`` can run: the weights + record (default), the ONNX model, TorchScript (``--trust`` only)."""


def _network(root: Path, model: str, trust: bool) -> tuple[Any, str, str]:
    """(network returning SCSEUNetOutput, the file it came from, its SHA-256)."""
    from pneumoseg.model_record import load_trained_model
    from pneumoseg.sharing.model import ExportedModel

    if model == "state_dict":
        trained = load_trained_model(root)
        return trained.network, "model.pt", trained.weights_sha256
    if model not in MODELS:
        raise ValueError(f"--model {model}: expected one of {', '.join(MODELS)}")
    path = root / "models" / ("model.onnx" if model == "onnx" else "model.ts")
    network = ExportedModel.load(path, trust=trust)
    return network, path.name, network.sha256


def evaluate_site(
    bundle: str | os.PathLike,
    manifest: str | os.PathLike,
    split: str = "test",
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    model: str = "state_dict",
    image_size: int | None = None,
    batch_size: int = 4,
    trust: bool = False,
) -> dict[str, Any]:
    """Measure the bundle on ``manifest[split]``; write the JSON / Markdown report and calibration plot.

    ``image_size`` may only repeat the record's radiograph input size (a model is fed as it was trained).
    Returns the report dict plus the written paths under ``json``, ``markdown``, ``calibration_plot`` and the
    Markdown text under ``markdown_text``.
    """
    from monai.data import DataLoader, Dataset
    from monai.metrics import DiceMetric, compute_roc_auc
    from monai.transforms import Compose, SelectItemsd

    from pneumoseg.data.transforms import radiograph_validation_transforms
    from pneumoseg.engine.datalist import check_datalist
    from pneumoseg.metrics import PositiveImageDiceMetric
    from pneumoseg.model_record import RADIOGRAPH, ModelRecord
    from pneumoseg.postprocessing import DualOutputPostprocess
    from pneumoseg.sharing.archive import printable
    from pneumoseg.sharing.metadata import read_json, sender_metrics

    root = Path(bundle)
    record = ModelRecord.read(root / "models" / "model_record.json")
    prep = record.radiograph
    if prep is None:
        kinds = ", ".join(record.kinds)
        raise ValueError(f"{root}: site evaluation runs radiograph models; this one was trained on {kinds}")
    size = prep.image_size
    if image_size is not None and int(image_size) != size:
        raise ValueError(
            f"--image_size {image_size}: the model was trained at {size} px ({RADIOGRAPH} preprocessing of "
            "models/model_record.json) and is evaluated as it was trained; leave --image_size out"
        )
    network, model_name, model_sha = _network(root, model, trust)
    try:
        meta = read_json(root / "configs" / "metadata.json")
        meta = meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        meta = {}
    bundle_name = printable(str(meta.get("name", root.name)), 80)
    bundle_version = printable(str(meta.get("version", "?")), 40)
    sender_threshold = record.operating_threshold
    pp = record.postprocessing
    postprocess = DualOutputPostprocess.from_thresholds(pp)

    entries = check_datalist(manifest, split, data_root)
    volumes = [
        e["image"] for e in entries if str(e["image"]).endswith((".nii", ".nii.gz")) or Path(e["image"]).is_dir()
    ]
    if volumes:
        raise ValueError(f"{manifest}[{split}]: site evaluation handles radiographs only; CT volume {volumes[0]}")
    preprocessing = radiograph_validation_transforms(
        spatial_size=size, lower=prep.lower_percentile, upper=prep.upper_percentile
    )
    transform = Compose([preprocessing, SelectItemsd(keys=["image", "label"])])
    loader = DataLoader(Dataset(entries, transform), batch_size=batch_size, shuffle=False, num_workers=0)
    dice_all, dice_pos = DiceMetric(ignore_empty=False), PositiveImageDiceMetric()  # SIIM Dice, positive only
    probs, truths = [], []
    with torch.no_grad():
        for batch in loader:
            image = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor).float()
            label = (torch.as_tensor(batch["label"]).as_subclass(torch.Tensor) > 0.5).float()
            out = network(image)
            seg_prob, cls_prob = torch.sigmoid(out.seg), torch.sigmoid(out.cls).reshape(-1)
            masks = torch.stack([postprocess(seg_prob[i], cls_prob[i]) for i in range(len(cls_prob))])
            dice_all(masks, label)
            dice_pos(masks, label)
            probs.append(cls_prob.numpy())
            truths.append(label.flatten(1).amax(1).numpy() > 0)
    prob, truth = np.concatenate(probs).astype(float), np.concatenate(truths)

    def number(t: torch.Tensor) -> float | None:
        v = float(t)
        return v if math.isfinite(v) else None

    auc = None
    if truth.any() and not truth.all():
        auc = float(compute_roc_auc(torch.as_tensor(prob), torch.as_tensor(truth.astype(float))))
    local = youden_threshold(prob, truth)
    rows, ece = calibration_bins(prob, truth)
    report: dict[str, Any] = {
        "bundle": {"name": bundle_name, "version": bundle_version, "model": model_name, "model_sha256": model_sha},
        "data": {
            "manifest": Path(manifest).name,
            "split": split,
            "images": int(len(prob)),
            "positive_images": int(truth.sum()),
            "image_size": size,
            "intensity_percentiles": [prep.lower_percentile, prep.upper_percentile],
        },
        "postprocessing": dataclasses.asdict(pp),
        "siim_dice": number(dice_all.aggregate()),
        "siim_dice_positive": number(dice_pos.aggregate()),
        "auc": auc,
        "at_sender_threshold": rates_at(prob, truth, sender_threshold),
        "at_local_threshold": {**rates_at(prob, truth, local), "method": "max Youden J (tuned on these images)"}
        if local is not None
        else None,
        "calibration": {"bins": rows, "ece": ece},
        "sender_reported": sender_metrics(meta),
    }
    # default next to the bundle, not inside: the received bundle stays exactly what was verified
    out = Path(out_dir) if out_dir else root.resolve().parent / f"{root.resolve().name}_site_validation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_validation.json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"{report['bundle']['name']} {report['bundle']['version']} on {report['data']['manifest']}[{split}]"
    _plot_calibration(rows, ece, title, out / "calibration.png")
    sender = report["sender_reported"]
    s, loc = report["at_sender_threshold"], report["at_local_threshold"] or {}
    md = [
        f"# Site validation: {title}",
        "",
        f"Model `{model_name}` (sha256 `{model_sha[:16]}...`), {len(prob)} images "
        f"({int(truth.sum())} with pneumothorax), input {size} x {size}, post-processing {dataclasses.asdict(pp)}.",
        "",
        "| metric | this site | sender reported |",
        "| --- | --- | --- |",
        f"| SIIM Dice | {_fmt(report['siim_dice'])} | {_fmt(sender.get('val_siim_dice'))} |",
        f"| Dice, positive images | {_fmt(report['siim_dice_positive'])} | "
        f"{_fmt(sender.get('val_siim_dice_positive'))} |",
        f"| ROC-AUC | {_fmt(auc)} | {_fmt(sender.get('val_auc'))} |",
        f"| sensitivity @ sender threshold {sender_threshold:g} | {_fmt(s['sensitivity'])} | "
        f"{_fmt(sender.get('val_sensitivity'))} |",
        f"| specificity @ sender threshold {sender_threshold:g} | {_fmt(s['specificity'])} | "
        f"{_fmt(sender.get('val_specificity'))} |",
        f"| sensitivity @ local threshold {_fmt(loc.get('threshold'))} | {_fmt(loc.get('sensitivity'))} | |",
        f"| specificity @ local threshold {_fmt(loc.get('threshold'))} | {_fmt(loc.get('specificity'))} | |",
        f"| expected calibration error (10 bins) | {ece:.4f} | |",
        "",
        "The local threshold maximises Youden's J on these same images (optimistic): confirm it on another "
        "local split before using it. Calibration plot: `calibration.png`.",
        "",
    ]
    markdown = "\n".join(md)
    (out / "site_validation.md").write_text(markdown)
    return {
        **report,
        "json": str(out / "site_validation.json"),
        "markdown": str(out / "site_validation.md"),
        "calibration_plot": str(out / "calibration.png"),
        "markdown_text": markdown,
    }
