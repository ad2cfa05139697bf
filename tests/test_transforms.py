"""Transform chains on phantom files: shapes, ranges, binary masks, image/mask alignment, inversion."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.transform import resize

from pneumoseg.data import phantoms
from pneumoseg.data import transforms as T
from pneumoseg.data.rle import read_siim_csv

SEED, SIZE, S = 5, 128, 64
CT_SIZE, CT_SLICES, CT_S = 40, 12, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Phantom files plus manifest-like entries: SIIM (DICOM + RLE), mask file (PNG), CT (NIfTI, DICOM)."""
    out = tmp_path_factory.mktemp("phantoms")
    mix = dict(compressed_fraction=0.5, monochrome1_fraction=0.5)
    phantoms.synthesize(
        out, radiographs=4, size=SIZE, ct=2, ct_size=CT_SIZE, ct_slices=CT_SLICES, seed=SEED, workers=1, **mix
    )
    plan = phantoms.plan_radiographs(4, SEED, SIZE, **mix)
    # the chains must see both photometric interpretations and compressed files
    assert {c.photometric for c in plan} == {"MONOCHROME1", "MONOCHROME2"}
    assert {c.transfer_syntax for c in plan} > {"explicit"}
    rows = read_siim_csv(out / phantoms.RLE_CSV)
    radiographs = []
    for case in plan:
        image, mask = phantoms.draw_radiograph_case(case, SEED, SIZE)
        png = out / f"{case.sop_uid}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(png)  # masks as files are usually 0/255
        path = str(out / case.relative_path)
        radiographs.append(
            {
                "siim": {"image": path, "label_rle": rows[case.sop_uid], "has_pneumothorax": int(case.positive)},
                "file": {"image": path, "label": str(png), "has_pneumothorax": int(case.positive)},
                "mask": mask,
                "pixels": image,
            }
        )
    disk = np.hypot(*np.mgrid[:SIZE, :SIZE] - np.array([SIZE * 0.4, SIZE * 0.6])[:, None, None]) < SIZE * 0.25
    disk_png = out / "disk.png"
    Image.fromarray(disk.astype(np.uint8) * 255).save(disk_png)
    cts = []
    for case in phantoms.plan_ct(2, SEED):
        hu, mask, _ = phantoms.draw_ct_case(case, SEED, CT_SIZE, CT_SLICES)
        nifti = out / phantoms.CT_NIFTI_DIR
        cts.append(
            {
                "nifti": {
                    "image": str(nifti / "images" / f"{case.name}.nii.gz"),
                    "label": str(nifti / "labels" / f"{case.name}.nii.gz"),
                },
                "dicom": {"image": str(out / phantoms.CT_DICOM_DIR / case.name)},
                "hu": hu,
                "mask": mask,
            }
        )
    # a big off-centre disk as image and mask file: follows geometry exactly, unlike a thin pneumothorax rim
    return {
        "radiographs": radiographs,
        "ct": cts,
        "disk": {"image": str(disk_png), "label": str(disk_png)},
        "disk_mask": disk,
    }


def _ras(array: np.ndarray, like: str) -> np.ndarray:
    """``array`` stored on the grid of the NIfTI ``like``, brought to RAS (nibabel, independently of MONAI)."""
    from nibabel.orientations import apply_orientation, io_orientation

    return apply_orientation(array, io_orientation(nib.load(like).affine))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _check_2d(sample: dict, size: int, min_max: float = 0.9) -> None:
    """image float [1, S, S] in [0, 1] reaching at least ``min_max``; label [1, S, S] in {0, 1}."""
    image, label = sample["image"], sample["label"]
    assert tuple(image.shape) == tuple(label.shape) == (1, size, size)
    assert image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1 and image.max() > min_max
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0}


def test_radiograph_validation_chain_siim_and_mask_file_entries(data: dict) -> None:
    chain = T.radiograph_validation_transforms(spatial_size=S)
    for item in data["radiographs"]:
        siim, from_file = chain(dict(item["siim"])), chain(dict(item["file"]))
        _check_2d(siim, S)
        _check_2d(from_file, S)
        torch.testing.assert_close(siim["label"], from_file["label"])
        torch.testing.assert_close(siim["image"], from_file["image"])
        # nearest resizing samples pixel centres: the label is the mask's subsampling, in [H, W] order
        expected = resize(item["mask"], (S, S), order=0, anti_aliasing=False)
        np.testing.assert_array_equal(siim["label"][0].numpy(), expected)
        assert bool(siim["label"].any()) == item["mask"].any()
        # the image is the phantom (not transposed, not inverted for MONOCHROME1): correlates with it
        reference = resize(item["pixels"].astype(np.float32), (S, S), anti_aliasing=True)
        assert np.corrcoef(siim["image"][0].numpy().ravel(), reference.ravel())[0, 1] > 0.95


def test_radiograph_train_chain_shapes_ranges_binary(data: dict) -> None:
    chain = T.radiograph_train_transforms(spatial_size=S, prob=1.0, rotate_deg=20, scale=0.2, translate=0.1)
    for seed in range(3):
        chain.set_random_state(seed)
        for item in data["radiographs"]:
            _check_2d(chain(dict(item["siim"])), S, min_max=0.5)  # brightness augmentation may dim it


def test_flip_applies_to_image_and_mask_together(data: dict) -> None:
    plain = T.radiograph_validation_transforms(spatial_size=S)
    flip_only = T.radiograph_train_transforms(spatial_size=S, prob=0.0, flip_prob=1.0)
    item = next(i for i in data["radiographs"] if i["mask"].any())
    a, b = plain(dict(item["siim"])), flip_only(dict(item["siim"]))
    torch.testing.assert_close(b["image"].as_tensor(), torch.flip(a["image"].as_tensor(), dims=[2]))
    torch.testing.assert_close(b["label"].as_tensor(), torch.flip(a["label"].as_tensor(), dims=[2]))
    assert not torch.equal(a["label"], b["label"])  # a one-sided pneumothorax changes side


def test_affine_augmentation_moves_image_and_mask_together(data: dict) -> None:
    # an entry whose image is the mask itself: after the random affine, image and label must still coincide
    entry = data["disk"]
    chain = T.radiograph_train_transforms(
        spatial_size=S, prob=1.0, flip_prob=0.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), rotate_deg=15
    )
    plain = T.radiograph_validation_transforms(spatial_size=S)(dict(entry))
    for seed in range(3):
        chain.set_random_state(seed)
        moved = chain(dict(entry))
        _check_2d(moved, S)
        assert not torch.equal(moved["label"], plain["label"])  # it did move
        assert _dice(moved["image"][0].numpy() > 0.5, moved["label"][0].numpy()) > 0.97


def test_radiograph_inference_chain_inverts_to_source_geometry(data: dict) -> None:
    pre = T.radiograph_inference_transforms(spatial_size=S)
    post = T.invert_prediction_transforms(pre)
    val = T.radiograph_validation_transforms(spatial_size=S)
    for item in data["radiographs"]:
        sample = pre({"image": item["siim"]["image"]})
        assert tuple(sample["image"].shape) == (1, S, S)
        # a perfect model: logits from the model-size mask
        sample["pred"] = (val(dict(item["siim"]))["label"] * 2 - 1) * 10
        pred = post(sample)["pred"]
        assert tuple(pred.shape) == (1, SIZE, SIZE)
        assert set(torch.unique(pred).tolist()) <= {0.0, 1.0}
        assert bool(pred.any()) == item["mask"].any()
    # geometry: a prediction equal to the (big) disk at model size maps back onto the source disk
    sample = pre({"image": data["disk"]["image"]})
    sample["pred"] = (sample["image"] * 2 - 1) * 10
    pred = post(sample)["pred"]
    assert tuple(pred.shape) == (1, SIZE, SIZE)
    assert _dice(pred[0].numpy(), data["disk_mask"]) > 0.98


def test_ct_train_chain_samples_positive_slices(data: dict, tmp_path: Path) -> None:
    item = next(c for c in data["ct"] if c["mask"].any())
    # keep the pneumothorax on 2 of the slices only, so that drawing positive slices by chance is unlikely
    mask = item["mask"].copy()
    mask[:, :, [k for k in range(CT_SLICES) if k not in (5, 6)]] = False
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), nib.load(item["nifti"]["label"]).affine), label)
    item = {**item, "mask": mask, "nifti": {**item["nifti"], "label": str(label)}}
    # without resizing/augmentation (which may drop a voxel-thin rim), pos=1, neg=0 draws positive slices only
    only_pos = T.ct_train_transforms(spatial_size=CT_SIZE, pos=1.0, neg=0.0, num_samples=6, prob=0.0, flip_prob=0.0)
    only_pos.set_random_state(0)
    samples = only_pos(dict(item["nifti"]))
    assert len(samples) == 6
    # the chain brings the volume to RAS first (the phantom is stored L-P-S: I and J flipped)
    hu, mask = _ras(item["hu"], item["nifti"]["image"]), _ras(item["mask"], item["nifti"]["image"])
    for sample in samples:
        _check_2d(sample, CT_SIZE, min_max=0.3)
        assert sample["label"].any()
        # the slice is one of the volume's axial slices, lung-windowed
        k = int(np.argmin([np.abs(sample["label"][0].numpy() - mask[:, :, k]).sum() for k in range(CT_SLICES)]))
        expected = np.clip((hu[:, :, k] + 1350) / 1500, 0, 1)
        np.testing.assert_allclose(sample["image"][0].numpy(), expected, atol=1e-5)
    augmented = T.ct_train_transforms(spatial_size=CT_S, num_samples=4, prob=1.0)
    augmented.set_random_state(0)
    for sample in augmented(dict(item["nifti"])):
        _check_2d(sample, CT_S, min_max=0.3)  # not every slice has bone (window top)


def test_ct_validation_window_and_shapes(data: dict) -> None:
    chain = T.ct_validation_transforms(spatial_size=CT_S)
    for item in data["ct"]:
        sample = chain(dict(item["nifti"]))
        image, label = sample["image"], sample["label"]
        assert tuple(image.shape) == tuple(label.shape) == (1, CT_S, CT_S, CT_SLICES)
        assert image.min() >= 0 and image.max() <= 1
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
        assert bool(label.any()) == bool(item["mask"].any())
        # lung window: air outside the body (-1000 HU) -> (-1000 + 1350) / 1500
        assert float(image[0, 0, 0, 0]) == pytest.approx(350 / 1500, abs=0.05)


def test_ct_dicom_series_and_nifti_give_the_same_input(data: dict) -> None:
    chain = T.ct_inference_transforms(spatial_size=CT_S)
    for item in data["ct"]:
        from_nifti, from_dicom = chain({"image": item["nifti"]["image"]}), chain(dict(item["dicom"]))
        torch.testing.assert_close(from_nifti["image"].as_tensor(), from_dicom["image"].as_tensor())
        np.testing.assert_allclose(from_nifti["image"].affine, from_dicom["image"].affine, atol=1e-3)


def test_ct_inference_chain_inverts_to_source_geometry(data: dict) -> None:
    pre = T.ct_inference_transforms(spatial_size=CT_S)
    post = T.invert_prediction_transforms(pre)
    item = next(c for c in data["ct"] if c["mask"].any())
    sample = pre({"image": item["nifti"]["image"]})
    sample["pred"] = (T.ct_validation_transforms(spatial_size=CT_S)(dict(item["nifti"]))["label"] * 2 - 1) * 10
    pred = post(sample)["pred"]
    assert tuple(pred.shape) == (1, CT_SIZE, CT_SIZE, CT_SLICES)
    assert _dice(pred[0].numpy(), item["mask"]) > 0.7


@pytest.mark.parametrize("as_numpy", [False, True])
def test_percentile_scaling_matches_monai(as_numpy: bool) -> None:
    # the project's faster percentile scaling must give MONAI's values (same percentile definition)
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentiles

    rng = np.random.default_rng(0)
    for shape, (lower, upper) in [((1, 97, 61), (0.5, 99.5)), ((2, 40, 30), (5.0, 80.0)), ((1, 16, 16, 5), (0, 100))]:
        x = (rng.gamma(2.0, 300.0, size=shape) - 100).astype(np.float32)
        expected = ScaleIntensityRangePercentiles(lower, upper, 0.0, 1.0, clip=True)(torch.from_numpy(x))
        image = x if as_numpy else MetaTensor(torch.from_numpy(x), meta={"filename_or_obj": "a.dcm"})
        out = T.PercentileScaleIntensityd(keys="image", lower=lower, upper=upper)({"image": image})["image"]
        assert type(out) is (np.ndarray if as_numpy else MetaTensor)
        if not as_numpy:
            assert out.meta["filename_or_obj"] == "a.dcm"
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    constant = T.PercentileScaleIntensity(0.5, 99.5, b_min=0.0)(torch.full((1, 8, 8), 7.0))
    assert torch.equal(constant, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="percentiles"):
        T.PercentileScaleIntensity(60, 40)


def test_radiograph_resize_averages_and_inverts_smoothly() -> None:
    # shrinking by 2 averages 2x2 blocks (no aliasing); the prediction's inverse is bilinear, not replication
    from monai.data import MetaTensor

    checker = (np.indices((128, 128)).sum(0) % 2).astype(np.float32)  # worst case for aliasing
    pre = T.radiograph_inference_transforms(spatial_size=64)
    chain = T.Compose(pre.transforms[1:2])  # the resize alone
    sample = chain({"image": MetaTensor(torch.from_numpy(checker)[None])})
    np.testing.assert_allclose(sample["image"].numpy(), 0.5)
    yy, xx = np.mgrid[:64, :64]
    soft = 1 / (1 + np.exp(-(28.0 - np.hypot(yy - 32, xx - 30))))  # a soft disk
    sample["pred"] = MetaTensor(torch.from_numpy(soft.astype(np.float32))[None], meta=dict(sample["image"].meta))
    pred = T.invert_prediction_transforms(chain, sigmoid=False, threshold=None)(sample)["pred"]
    assert tuple(pred.shape) == (1, 128, 128)
    blocks = pred[0].numpy().reshape(64, 2, 64, 2)
    assert np.abs(blocks - blocks[:, :1, :, :1]).max() > 0.01  # not 2x2 replicated blocks
    assert sample["image"].applied_operations[-1]["extra_info"]["mode"] == "area"  # the sample is not changed


@pytest.mark.parametrize("shape", [(128, 128), (150, 97), (64, 64), (40, 90)])
def test_radiograph_inverse_is_monai_invertd_of_one_bilinear_resize(shape) -> None:
    # MONAI's Invertd over the chain gives exactly one bilinear resize of the mask to the source size (the
    # inverse AreaResize records), thresholded at 0.5, whether the chain shrank or enlarged the image
    import torch.nn.functional as F
    from monai.data import MetaTensor

    pre = T.radiograph_inference_transforms(spatial_size=64, load=False)
    rng = np.random.default_rng(sum(shape))
    sample = pre({"image": MetaTensor(torch.from_numpy(rng.random(shape, dtype=np.float32))[None])})
    yy, xx = np.mgrid[:64, :64]
    mask = torch.from_numpy((np.sin(yy / 3.0) * np.cos(xx / 5.0) > 0.3).astype(np.float32))[None]  # many edges
    sample["pred"] = MetaTensor(mask.clone(), meta=dict(sample["image"].meta))
    monai = T.invert_prediction_transforms(pre, sigmoid=False, threshold=0.5)(sample)["pred"][0].numpy() > 0.5
    one = F.interpolate(mask[None], size=shape, mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5
    assert monai.shape == shape and np.array_equal(monai, one)
    assert 0 < monai.sum() < monai.size
    assert [op["class"] for op in sample["image"].applied_operations] == ["AreaResize"]  # the sample keeps it


def test_ct_chain_orients_the_volume_and_inverts_exactly() -> None:
    """A NIfTI stored with J reversed and its axes permuted reaches the model in RAS, and the prediction comes
    back on the stored grid (MONAI's Orientationd + Invertd)."""
    from monai.data import MetaTensor

    ras = np.zeros((32, 32, 6), np.float32)
    ras[4:10, 20:28, 2:4] = 1.0  # an asymmetric block, in RAS order
    affine_ras = np.diag([1.0, 1.0, 2.5, 1.0])
    # stored as [K, I, J] with J reversed: the compensating affine describes the same voxels
    stored = np.ascontiguousarray(ras[:, ::-1, :].transpose(2, 0, 1))
    flip_j = np.eye(4)
    flip_j[1, 1], flip_j[1, 3] = -1.0, 31.0
    permute = np.zeros((4, 4))
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1.0
    affine = affine_ras @ flip_j @ permute
    chain = T.ct_inference_transforms(spatial_size=32, window=(0.0, 1.0), load=False)
    sample = chain({"image": MetaTensor(torch.from_numpy(stored)[None], affine=torch.from_numpy(affine))})
    np.testing.assert_array_equal(sample["image"][0].numpy(), ras)  # the model sees RAS, slices along K
    sample["pred"] = MetaTensor(sample["image"].as_tensor().clone(), meta=dict(sample["image"].meta))
    back = T.invert_prediction_transforms(chain, sigmoid=False, threshold=0.5)(sample)["pred"][0].numpy()
    np.testing.assert_array_equal(back, stored)


def test_a_single_slice_keeps_its_thin_axis_last() -> None:
    coronal = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    assert T.slice_orientation(coronal, (64, 1, 48)) == "RSA"  # the one coronal slice is the model's slice
    assert T.slice_orientation(coronal, (64, 64, 1)) == "RAS"  # an axial slice: RAS already
    assert T.slice_orientation(np.diag([-1.0, -1, 1, 1]), (1, 64, 48)) == "ASR"  # sagittal, stored L
    assert T.slice_orientation(coronal, (64, 64, 6)) == "RAS"
    assert T.orientation_with_last("LPS", "A") == "LSP"
