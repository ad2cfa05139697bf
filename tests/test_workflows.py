"""Unit tests of the bundle's engine components (pneumoseg.workflows, .metrics, .postprocessing)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pneumoseg.data.rle import encode_siim_rle
from pneumoseg.losses import FusedMultiTaskLoss
from pneumoseg.metrics import SIIMDiceMetric
from pneumoseg.networks import SCSEUNet, SCSEUNetOutput
from pneumoseg.postprocessing import (
    DualOutputPostprocess,
    DualOutputPostprocessd,
    PostprocessingParams,
    PostprocessingSearch,
    load_postprocessing_params,
    per_image_dice,
    save_postprocessing_params,
)
from pneumoseg.workflows import (
    AutocastInferer,
    DatalistError,
    DualOutputSliceInferer,
    EpochSeedHandler,
    MetricsLogger,
    MultiTaskLoss,
    MultiTaskOutputHandler,
    MultiTaskPrepareBatch,
    MultiTaskTarget,
    check_datalist,
    loss_terms,
)


def _masks(seed: int = 0, b: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, size, size)
    for i in range(b):
        if i % 2:  # odd images positive: a random box
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[i, 0, y : y + size // 3, x : x + size // 3] = 1
    return masks


# ----------------------------------------------------------------------------------- batch, loss, output


def test_prepare_batch_derives_image_label_from_mask():
    masks = _masks()
    image, target = MultiTaskPrepareBatch()({"image": torch.rand(4, 1, 16, 16), "label": masks}, "cpu")
    assert image.shape == (4, 1, 16, 16)
    assert isinstance(target, MultiTaskTarget)
    assert torch.equal(target.seg, masks)
    assert target.cls.tolist() == [[0.0], [1.0], [0.0], [1.0]]
    _, none = MultiTaskPrepareBatch()({"image": torch.rand(2, 1, 8, 8)}, "cpu")
    assert none is None


def test_loss_adapter_matches_fused_loss_and_keeps_terms():
    g = torch.Generator().manual_seed(1)
    pred = SCSEUNetOutput(torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, generator=g))
    masks = _masks()
    adapter = MultiTaskLoss(cls_weight=0.3)
    reference = FusedMultiTaskLoss(cls_weight=0.3)(pred.seg, pred.cls, masks)
    total = adapter(pred, MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()))
    assert torch.allclose(total, reference.total)
    assert torch.allclose(adapter.last_terms.cls_bce, reference.cls_bce)
    assert torch.allclose(adapter(pred, masks), reference.total)  # a bare mask works too
    with pytest.raises(TypeError, match="SCSEUNetOutput"):
        adapter((pred.seg, pred.cls), masks)


def test_output_handler_exposes_plain_tensors():
    masks = _masks()
    seg_logits = torch.where(masks > 0, 4.0, -4.0)  # confident and right
    cls_logits = torch.tensor([[-3.0], [3.0], [0.1], [3.0]])
    loss = MultiTaskLoss()
    total = loss(SCSEUNetOutput(seg_logits, cls_logits), masks)
    engine = SimpleNamespace(
        state=SimpleNamespace(
            output={
                "image": torch.zeros(4, 1, 16, 16),
                "label": MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()),
                "pred": SCSEUNetOutput(seg_logits, cls_logits),
                "loss": total,
            }
        )
    )
    MultiTaskOutputHandler(loss_function=loss, operating_threshold=0.5)(engine)
    out = engine.state.output
    assert torch.equal(out["pred"], masks)  # 0.5 threshold of sigmoid(+-4)
    assert out["seg_prob"].shape == (4, 1, 16, 16) and out["pred_cls"].shape == (4, 1)
    assert out["pred_label"].flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert out["label_cls"].flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert set(loss_terms(out)) == {"loss", "seg_bce", "seg_dice", "cls_bce"}
    # trainer form: one dict per image, scalars replicated (what MONAI's default trainer handlers read)
    from monai.handlers import from_engine

    engine.state.output = {
        "label": MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()),
        "pred": SCSEUNetOutput(seg_logits, cls_logits),
        "loss": total,
    }
    MultiTaskOutputHandler(loss_function=loss, decollate=True)(engine)
    items = engine.state.output
    assert isinstance(items, list) and len(items) == 4 and items[3]["pred"].shape == (1, 16, 16)
    assert float(from_engine(["loss"], first=True)(items)) == pytest.approx(float(total))
    assert loss_terms(items) == pytest.approx(loss_terms(out))
    engine.state.output = {"pred": seg_logits}
    with pytest.raises(TypeError, match="SCSEUNetOutput"):
        MultiTaskOutputHandler()(engine)


# --------------------------------------------------------------------------------------- post-processing


def test_dual_output_postprocess_rule():
    prob = torch.zeros(1, 10, 10)
    prob[0, :3, :3] = 0.9  # 9 confident pixels
    prob[0, 3, :3] = 0.4  # a rim above bottom=0.3 only
    pp = DualOutputPostprocess(t_cls=0.5, top=0.8, min_area=5, bottom=0.3)
    assert pp(prob, 0.4).sum() == 0  # gated by the image probability
    assert pp(prob, torch.tensor([0.6])).sum() == 12  # kept: 9 core + 3 rim pixels above bottom
    assert DualOutputPostprocess(t_cls=0.5, top=0.8, min_area=10, bottom=0.3)(prob, 0.9).sum() == 0  # too small
    d = DualOutputPostprocessd(keys="seg_prob", cls_key="pred_cls", output_key="pred", t_cls=0.0, top=0.5, bottom=0.5)(
        {"seg_prob": prob, "pred_cls": 0.1}
    )
    assert d["pred"].sum() == 9


def test_postprocessing_params_file_roundtrip(tmp_path: Path):
    path = tmp_path / "pp.json"
    save_postprocessing_params(path, PostprocessingParams(0.3, 0.7, 25, 0.4), search={"x": 1})
    assert load_postprocessing_params(path) == PostprocessingParams(0.3, 0.7, 25, 0.4)
    assert load_postprocessing_params(path, min_area=5).min_area == 5
    assert load_postprocessing_params(tmp_path / "missing.json") == PostprocessingParams()
    path.write_text(json.dumps({"t_cls": 0.1, "threshold": 2}))
    with pytest.raises(ValueError, match="threshold"):
        load_postprocessing_params(path)


def test_search_statistics_give_the_same_dice_as_applying_the_rule():
    g = torch.Generator().manual_seed(3)
    truth = _masks(seed=3, b=6)
    prob = (0.6 * truth + 0.5 * torch.rand(6, 1, 16, 16, generator=g)).clamp(0, 1)
    cls = torch.rand(6, 1, generator=g)
    search = PostprocessingSearch()
    search.update(prob[:3], cls[:3], truth[:3])
    search.update(prob[3:], cls[3:], truth[3:])
    stats = search.statistics()
    for params in (
        PostprocessingParams(),
        PostprocessingParams(0.3, 0.7, 25, 0.4),
        PostprocessingParams(0.5, 0.9, 10, 0.2),
    ):
        pp = DualOutputPostprocess(params.t_cls, params.top, params.min_area, params.bottom)
        expected = np.mean([per_image_dice(pp(p, c), t) for p, c, t in zip(prob, cls, truth)])
        assert search.dice(stats, params) == pytest.approx(expected, abs=1e-6)
    best, best_dice, summary = search.search(stats)
    assert summary["images"] == 6
    assert best_dice >= search.dice(stats, PostprocessingParams()) - 1e-9
    pp = DualOutputPostprocess(best.t_cls, best.top, best.min_area, best.bottom)
    assert best_dice == pytest.approx(
        np.mean([per_image_dice(pp(p, c), t) for p, c, t in zip(prob, cls, truth)]), abs=1e-6
    )


def test_search_removes_false_positive_specks_with_min_area():
    truth = torch.zeros(2, 1, 16, 16)
    truth[1, 0, 2:10, 2:10] = 1
    prob = torch.zeros(2, 1, 16, 16)
    prob[0, 0, 0, 0] = 0.95  # one-pixel speck on a negative image
    prob[1, 0, 2:10, 2:10] = 0.95
    search = PostprocessingSearch({"t_cls": [0.0], "min_area": [0, 10]})
    search.update(prob, torch.ones(2, 1), truth)
    params, dice, _ = search.search()
    assert search.dice(search.statistics(), PostprocessingParams()) == pytest.approx(0.5)
    assert params.min_area == 10 and dice == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- metrics


def test_siim_dice_metric_counts_empty_on_empty_as_one():
    truth = torch.zeros(3, 1, 4, 4)
    truth[1, 0, :2, :2] = 1
    truth[2, 0, :2, :2] = 1
    pred = torch.zeros(3, 1, 4, 4)
    pred[1, 0, :2, :2] = 1  # perfect
    pred[2, 0, :1, :2] = 1  # 2 of 4 pixels: Dice 2*2/(2+4)
    metric = SIIMDiceMetric()
    metric(pred, truth)
    assert float(metric.aggregate()) == pytest.approx((1 + 1 + 2 / 3) / 3)
    positive = SIIMDiceMetric(positive_only=True)
    positive(pred, truth)
    assert float(positive.aggregate()) == pytest.approx((1 + 2 / 3) / 2)
    only_negative = SIIMDiceMetric(positive_only=True)
    only_negative(pred[:1], truth[:1])
    assert torch.isnan(only_negative.aggregate())


# -------------------------------------------------------------------------------------------- inferers


def test_slice_inferer_returns_3d_mask_and_max_slice_logit():
    torch.manual_seed(0)
    net = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8), head_channels=8).eval()
    volume = torch.rand(1, 1, 64, 64, 3)
    with torch.no_grad():
        out = DualOutputSliceInferer(roi_size=(64, 64), sw_batch_size=2)(volume, net)
        per_slice = [net(volume[..., k]) for k in range(3)]
    assert out.seg.shape == (1, 1, 64, 64, 3)
    assert torch.allclose(out.seg[..., 1], per_slice[1].seg, atol=1e-5)
    assert torch.allclose(out.cls, torch.stack([o.cls for o in per_slice]).amax(0), atol=1e-5)


def test_autocast_inferer_bf16_returns_fp32():
    net = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8), head_channels=8).eval()
    with torch.no_grad():
        out = AutocastInferer(enabled=True)(torch.rand(1, 1, 64, 64), net)
        ref = AutocastInferer(enabled=False)(torch.rand(1, 1, 64, 64), net)
    assert out.seg.dtype == torch.float32 and ref.seg.dtype == torch.float32


def test_epoch_seed_handler_repeats_augmentation_per_epoch():
    from monai.transforms import Compose, RandGaussianNoised

    transform = Compose([RandGaussianNoised(keys="x", prob=1.0)])
    handler = EpochSeedHandler(seed=7, transform=transform)
    sample = {"x": torch.zeros(1, 4, 4)}

    def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        handler(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
        return torch.as_tensor(transform(sample)["x"]), torch.rand(3)

    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


# ------------------------------------------------------------------------------------ pre-flight checks


def _write_dicom(path: Path, rows: int, cols: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.zeros((rows, cols), np.uint16), "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _manifest(tmp_path: Path, training: list, validation: list | None = None) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"data_root": ".", "training": training, "validation": validation or []}))
    return path


def test_check_datalist_accepts_good_entries(tmp_path: Path):
    _write_dicom(tmp_path / "a.dcm", 8, 6)
    mask = np.zeros((8, 6), bool)
    mask[2:4, 1:3] = True
    entry = {"image": "a.dcm", "label_rle": [encode_siim_rle(mask)], "has_pneumothorax": 1, "patient_hash": "h"}
    entries = check_datalist(_manifest(tmp_path, [entry]), "training")
    assert entries[0]["image"] == str(tmp_path / "a.dcm")
    assert entries[0]["label_rle"] == entry["label_rle"]


def test_check_datalist_names_bad_entries(tmp_path: Path):
    import nibabel as nib

    _write_dicom(tmp_path / "a.dcm", 8, 6)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), np.uint8), np.eye(4)), str(tmp_path / "ct_mask.nii.gz"))
    too_long = encode_siim_rle(np.ones((10, 6), bool))  # runs past an 8 x 6 image
    manifest = _manifest(
        tmp_path,
        [
            {"image": "a.dcm", "label_rle": ["-1"]},
            {"image": "missing.dcm", "label_rle": ["-1"]},
            {"image": "a.dcm", "label_rle": [too_long]},
            {"image": "ct.nii.gz", "label": "ct_mask.nii.gz"},
        ],
    )
    with pytest.raises(DatalistError) as err:
        check_datalist(manifest, "training")
    message = str(err.value)
    assert "3 bad manifest entries" in message
    assert "[training][1] missing.dcm: image file not found" in message
    assert "[training][2] a.dcm: label_rle does not fit the 8x6 image" in message
    assert "[training][3] ct.nii.gz: image shape (4, 5, 3) != label shape (4, 5, 2)" in message
    with pytest.raises(DatalistError, match="split 'validation' is empty"):
        check_datalist(manifest, "validation")
    with pytest.raises(DatalistError, match="no split 'test'"):
        check_datalist(manifest, "test")
    with pytest.raises(DatalistError, match="manifest not found"):
        check_datalist(tmp_path / "nope.json")


def test_metrics_logger_writes_json_for_numpy_torch_and_nan(tmp_path: Path):
    metrics = {"auc": np.float32(0.75), "dice": torch.tensor(0.5), "nan": float("nan"), "n": 3}
    engine = SimpleNamespace(state=SimpleNamespace(epoch=2, metrics=metrics))
    logger = MetricsLogger(str(tmp_path / "history.jsonl"))
    logger(engine)
    logger(engine)
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 2, "auc": 0.75, "dice": 0.5, "nan": None, "n": 3}] * 2
