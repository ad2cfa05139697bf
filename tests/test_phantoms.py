"""Synthetic phantoms: files read back exactly, masks agree with the RLE CSV / NIfTI, determinism, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pneumoseg.cli import build_parser
from pneumoseg.data import phantoms
from pneumoseg.data.rle import decode_siim_rle, read_siim_csv

SEED = 3
SIZE = 96
CT_SIZE, CT_SLICES = 32, 10


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    phantoms.synthesize(
        out,
        radiographs=12,
        size=SIZE,
        ct=2,
        ct_size=CT_SIZE,
        ct_slices=CT_SLICES,
        seed=SEED,
        compressed_fraction=0.75,
        monochrome1_fraction=0.5,
        workers=1,
    )
    return out


def _plan() -> list[phantoms.RadiographCase]:
    return phantoms.plan_radiographs(12, SEED, SIZE, 0.5, 0.75, 0.5)


def test_radiograph_phantom_shapes_and_pneumothorax() -> None:
    image, mask = phantoms.make_radiograph_phantom(128, True, np.random.default_rng(0), bits_stored=12)
    assert image.shape == mask.shape == (128, 128)
    assert image.dtype == np.uint16 and mask.dtype == bool
    assert image.max() <= 4095 and image.max() > 2000  # uses the 12-bit range
    assert 0.002 < mask.mean() < 0.2
    # the pneumothorax is air: darker than the image on average, and than the lung just inside it
    assert image[mask].mean() < image.mean()
    _, negative_mask = phantoms.make_radiograph_phantom(128, False, np.random.default_rng(0))
    assert not negative_mask.any()


def test_pneumothorax_sizes_and_sides_vary() -> None:
    masks = [phantoms.make_radiograph_phantom(64, True, np.random.default_rng(i))[1] for i in range(12)]
    areas = np.array([m.sum() for m in masks])
    assert areas.min() > 0 and areas.max() > 2.5 * areas.min()
    left_side = [m[:, :32].sum() > m[:, 32:].sum() for m in masks]
    assert 0 < sum(left_side) < len(masks)


def test_dicom_files_read_back_exactly_and_match_rle_csv(synth_dir: Path) -> None:
    rows = read_siim_csv(synth_dir / phantoms.RLE_CSV)
    cases = _plan()
    assert set(rows) == {c.sop_uid for c in cases}
    syntaxes, photometrics = set(), set()
    for case in cases:
        path = synth_dir / case.relative_path
        ds = pydicom.dcmread(path)
        assert (ds.Modality, ds.BodyPartExamined, ds.PatientID) == ("CR", "CHEST", case.patient_id)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert ds.SOPInstanceUID == case.sop_uid and path.parent.name == ds.SeriesInstanceUID
        assert path.parent.parent.name == ds.StudyInstanceUID
        assert 12 <= ds.BitsStored <= 16 and ds.BitsAllocated == 16
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        photometrics.add(ds.PhotometricInterpretation)
        image, mask = phantoms.draw_radiograph_case(case, SEED, SIZE)
        pixels = ds.pixel_array.astype(np.int64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = (2**ds.BitsStored - 1) - pixels
        np.testing.assert_array_equal(pixels, image)  # lossless, MONOCHROME1 inverts back
        np.testing.assert_array_equal(decode_siim_rle(rows[case.sop_uid], SIZE, SIZE), mask)
        assert (rows[case.sop_uid] != ["-1"]) == case.positive
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert len(syntaxes) >= 3  # uncompressed and at least two lossless compressed syntaxes


def test_spacing_tags_and_patients_with_several_images() -> None:
    cases = phantoms.plan_radiographs(60, seed=0)
    assert {c.spacing_tag for c in cases} == {"PixelSpacing", "ImagerPixelSpacing", None}
    per_patient = np.unique([c.patient_id for c in cases], return_counts=True)[1]
    assert per_patient.max() >= 2 and per_patient.min() == 1
    assert sum(c.positive for c in cases) == 30
    assert sum(c.positive for c in phantoms.plan_radiographs(60, seed=0, positive_fraction=0.2)) == 12


def test_ct_nifti_matches_dicom_series_and_mask(synth_dir: Path) -> None:
    for case in phantoms.plan_ct(2, SEED):
        hu, mask, spacing = phantoms.draw_ct_case(case, SEED, CT_SIZE, CT_SLICES)
        image_nii = nib.load(synth_dir / phantoms.CT_NIFTI_DIR / "images" / f"{case.name}.nii.gz")
        label_nii = nib.load(synth_dir / phantoms.CT_NIFTI_DIR / "labels" / f"{case.name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(image_nii.dataobj), hu)
        np.testing.assert_array_equal(np.asarray(label_nii.dataobj).astype(bool), mask)
        assert mask.any() == case.positive
        np.testing.assert_allclose(image_nii.header.get_zooms(), spacing, rtol=1e-5)

        files = sorted((synth_dir / phantoms.CT_DICOM_DIR / case.name).glob("slice_*.dcm"))
        assert len(files) == CT_SLICES
        slices = [pydicom.dcmread(f) for f in files]
        assert {ds.SeriesInstanceUID for ds in slices} == {case.series_uid}
        assert all(ds.Modality == "CT" for ds in slices)
        volume = np.stack([ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], -1)
        np.testing.assert_array_equal(volume, hu)  # [I, J, K] = (column, row, slice)
        # voxel (i, j, k) -> LPS from the DICOM geometry, -> RAS, must equal the NIfTI affine
        ijk = np.array([[0, 0, 0], [CT_SIZE - 1, 3, 1], [5, CT_SIZE - 1, CT_SLICES - 1]])
        for i, j, k in ijk:
            ds = slices[k]
            row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
            dy, dx = (float(s) for s in ds.PixelSpacing)
            lps = np.array(ds.ImagePositionPatient, float) + i * dx * row_dir + j * dy * col_dir
            ras = lps * [-1, -1, 1]
            np.testing.assert_allclose(image_nii.affine @ [i, j, k, 1], [*ras, 1], atol=1e-3)
        # anatomy in HU: pneumothorax is air, lungs are about -850 with denser vessels, bone is bright
        if mask.any():
            assert hu[mask].mean() < -900
        assert hu.max() > 500 and hu.min() <= -1000


def test_ct_phantom_lungs_have_vessels_but_pneumothorax_has_none() -> None:
    hu, mask, spacing = phantoms.make_ct_phantom(64, 24, True, np.random.default_rng(1))
    assert hu.shape == mask.shape == (64, 64, 24) and hu.dtype == np.int16
    assert spacing == pytest.approx((360 / 64, 360 / 64, 240 / 24))
    lung = (hu > -950) & (hu < -700)
    assert lung.sum() > 1000
    assert np.percentile(hu[mask], 99) < -850  # no vessels / tissue inside the pneumothorax
    assert mask.any() and not (mask & (hu > 0)).any()


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(radiographs=4, size=64, ct=1, ct_size=24, ct_slices=6, compressed_fraction=0.5)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    phantoms.synthesize(a, seed=7, workers=1, **kwargs)
    phantoms.synthesize(b, seed=7, workers=2, **kwargs)
    phantoms.synthesize(c, seed=8, workers=1, **kwargs)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / phantoms.RLE_CSV).read_text() != (c / phantoms.RLE_CSV).read_text()


def test_about_half_positive(tmp_path: Path) -> None:
    summary = phantoms.synthesize(tmp_path, radiographs=10, size=48, ct=0, seed=1, workers=1)
    rows = read_siim_csv(tmp_path / phantoms.RLE_CSV)
    positive = sum(r != ["-1"] for r in rows.values())
    assert positive == summary.radiographs_positive == 5


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        phantoms.synthesize(tmp_path, radiographs=1, positive_fraction=1.5)
    with pytest.raises(ValueError, match="bits_stored"):
        phantoms.make_radiograph_phantom(64, False, np.random.default_rng(0), bits_stored=8)


def test_existing_outputs_are_only_replaced_with_overwrite_and_only_if_ours(tmp_path: Path) -> None:
    kwargs = dict(radiographs=2, size=48, ct=0, workers=1)
    phantoms.synthesize(tmp_path / "a", seed=1, **kwargs)
    with pytest.raises(ValueError, match="already exists"):
        phantoms.synthesize(tmp_path / "a", seed=2, **kwargs)
    phantoms.synthesize(tmp_path / "a", seed=2, overwrite=True, **kwargs)
    # the earlier run's files are gone: the directory holds exactly what the CSV lists
    assert len(list((tmp_path / "a").rglob("*.dcm"))) == 2 == len(read_siim_csv(tmp_path / "a" / phantoms.RLE_CSV))
    real = tmp_path / "siim"
    (real / phantoms.RADIOGRAPH_DIR).mkdir(parents=True)
    (real / phantoms.RADIOGRAPH_DIR / "keep.dcm").write_bytes(b"real data")
    with pytest.raises(ValueError, match="not written by"):
        phantoms.synthesize(real, seed=1, overwrite=True, **kwargs)
    assert (real / phantoms.RADIOGRAPH_DIR / "keep.dcm").read_bytes() == b"real data"


def test_cli_help_explains_every_option_and_synth_runs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pneumoseg", "synth"]
    help_text = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    flat_help = " ".join(help_text.split())
    options = [
        "--radiographs", "--size", "--ct", "--ct-size", "--ct-slices", "--positive-fraction", "--seed",
        "--compressed-fraction", "--monochrome1-fraction", "--workers", "--overwrite", "--hard",
    ]  # fmt: skip
    parser = build_parser(only="synth")
    synth = parser._subparsers._group_actions[0].choices["synth"]
    documented = {opt: a.help for a in synth._actions for opt in a.option_strings}
    for option in options:
        assert option in flat_help and len(documented[option]) > 15, f"{option} is not explained"
        assert " ".join(documented[option].split())[:40] in flat_help
    out = tmp_path / "tmp"
    result = subprocess.run(
        [*cmd, str(out), "--radiographs", "6", "--size", "128", "--ct", "1", "--ct-size", "48", "--ct-slices", "12"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((out / phantoms.RADIOGRAPH_DIR).rglob("*.dcm"))) == 6
    assert len(read_siim_csv(out / phantoms.RLE_CSV)) == 6
    assert len(list((out / phantoms.CT_DICOM_DIR / "ct_000").glob("slice_*.dcm"))) == 12
    assert (out / phantoms.CT_NIFTI_DIR / "labels" / "ct_000.nii.gz").is_file()
    assert "6 radiographs" in result.stdout
    again = subprocess.run(
        [*cmd, str(out), "--radiographs", "1", "--size", "64", "--ct", "0"], capture_output=True, text=True
    )
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


# ------------------------------------------------------------------------------------------- hard mode


def _hard(index: int, positive: bool, size: int = SIZE) -> tuple:
    return phantoms.make_radiograph_phantom(
        size, positive, np.random.default_rng([11, index]), hard=True, return_features=True
    )


def test_hard_radiographs_are_deterministic_by_seed() -> None:
    image, mask, features = _hard(0, True)
    again, again_mask, again_features = _hard(0, True)
    assert np.array_equal(image, again) and np.array_equal(mask, again_mask) and features == again_features
    other, other_mask, _ = _hard(1, True)
    assert not np.array_equal(image, other) and not np.array_equal(mask, other_mask)


def test_hard_radiographs_hold_what_they_claim() -> None:
    positives = [_hard(i, True) for i in range(24)]
    negatives = [_hard(100 + i, False) for i in range(12)]
    kinds = [kind for _, _, f in positives for _, kind, _ in f.pneumothorax]
    assert set(kinds) == set(phantoms.PNEUMOTHORAX_KINDS)
    for _, mask, features in positives:
        assert features.hard and mask.any() and features.pneumothorax
        sides = {side for side, _, _ in features.pneumothorax}
        # the patient's right lung is on the image's left
        assert mask[:, : SIZE // 2].any() == ("right" in sides) and mask[:, SIZE // 2 :].any() == ("left" in sides)
        if features.pneumothorax[0][1] == "apical" and len(sides) == 1:
            rows = np.nonzero(mask)[0]
            assert rows.mean() < 0.45 * SIZE  # over the apex, not along the whole wall
    assert any(len(f.pneumothorax) == 2 for _, _, f in positives)  # bilateral
    assert any(pleura == 0.0 for _, _, f in positives for *_, pleura in f.pneumothorax)  # no pleural line
    # mimics and devices on negative images too, whose masks stay empty
    assert all(not mask.any() for _, mask, _ in negatives)
    assert any(f.skin_folds for _, _, f in negatives) and any(f.devices for _, _, f in negatives)
    assert {d for _, _, f in positives + negatives for d in f.devices} == {"chest tube", "central line", "ECG leads"}
    assert len({f.positioning for _, _, f in negatives}) == len(negatives)
    # subtler than the easy mode: smaller air gaps; exposure varies more from image to image
    easy = [phantoms.make_radiograph_phantom(SIZE, True, np.random.default_rng([11, i])) for i in range(24)]
    assert np.median([m.sum() for _, m, _ in positives]) < 0.7 * np.median([m.sum() for _, m in easy])
    hard_means = [(im / im.max()).mean() for im, _, _ in positives]
    assert np.std(hard_means) > np.std([(im / im.max()).mean() for im, _ in easy])


def test_hard_gap_keeps_faded_markings_where_the_easy_gap_has_none() -> None:
    # the same lung drawn without noise: the easy gap is flat air, the hard one still carries vessel texture
    rng = np.random.default_rng(5)
    vessels = np.zeros((512, 512), np.float32)
    vessels[::8, :] = 1.0  # horizontal "markings" every 8 rows of the canvas
    grid = np.linspace(-1, 1, 256, dtype=np.float32)
    lung = phantoms._Lung(-0.4, -0.1, 0.3, 0.58, 1)
    bg = phantoms._Background(np.zeros((4, 4), np.float32), (0.0, 0.0), (5.0, 5.0), (0.1, 0.1))
    subtle = phantoms._SubtlePneumothorax("moderate", 0.8, 0.8, 0.55, 0.55, 0.5, 0.0, 0.0, 1.5)
    spreads = []
    for style in (None, subtle):
        image, mask = np.zeros((256, 256), np.float32), np.zeros((256, 256), bool)
        phantoms._draw_lung(image, mask, lung, grid, grid, bg, vessels, 0.3, rng, style)
        spreads.append(float(np.std(image[mask])))
    assert spreads[0] < 1e-6 < 0.01 < spreads[1]


def test_hard_synthesis_writes_monochrome1_and_rle_files_with_exact_masks(tmp_path: Path) -> None:
    summary = phantoms.synthesize(
        tmp_path, radiographs=8, size=64, ct=2, ct_size=32, ct_slices=8, seed=2, workers=1, hard=True,
        compressed_fraction=1.0, monochrome1_fraction=0.5,
    )  # fmt: skip
    assert summary.radiographs_positive == 4 and summary.ct_positive == 1
    rows = read_siim_csv(tmp_path / phantoms.RLE_CSV)
    cases = phantoms.plan_radiographs(8, 2, 64, 0.5, 1.0, 0.5, hard=True)
    photometrics, syntaxes = set(), set()
    for case in cases:
        assert case.hard
        ds = pydicom.dcmread(tmp_path / case.relative_path)
        photometrics.add(ds.PhotometricInterpretation)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        _, mask = phantoms.draw_radiograph_case(case, 2, 64)
        assert rows[case.sop_uid] == phantoms.mask_to_rle_rows(mask)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert phantoms.TRANSFER_SYNTAXES["rle"] in syntaxes
    for case in phantoms.plan_ct(2, 2, hard=True):
        hu, mask, _ = phantoms.draw_ct_case(case, 2, 32, 8)
        label = nib.load(tmp_path / phantoms.CT_NIFTI_DIR / "labels" / f"{case.name}.nii.gz")
        assert np.array_equal(np.asarray(label.dataobj) > 0, mask)


def test_hard_ct_holds_what_it_claims() -> None:
    drawn = [
        phantoms.make_ct_phantom(48, 16, i % 2 == 0, np.random.default_rng([12, i]), hard=True, return_features=True)
        for i in range(12)
    ]
    again = phantoms.make_ct_phantom(48, 16, True, np.random.default_rng([12, 0]), hard=True)
    assert np.array_equal(again[0], drawn[0][0]) and np.array_equal(again[1], drawn[0][1])
    assert len({round(spacing[2], 3) for _, _, spacing, _ in drawn}) == len(drawn)  # slice spacing varies
    assert len({round(f.noise_hu) for *_, f in drawn}) > 6
    kinds = {kind for *_, f in drawn for kind, _ in f.pneumothorax}
    assert kinds == {"small anterior", "moderate"}
    for hu, mask, _, features in drawn:
        assert mask.any() == bool(features.pneumothorax)
        if features.pneumothorax and features.pneumothorax[0][0] == "small anterior":
            # the air lies in front of the lung (J runs anterior -> posterior) and is small
            lung_j = np.nonzero((hu > -950) & (hu < -600))[1].mean()
            assert np.nonzero(mask)[1].mean() < lung_j and mask.mean() < 0.01
    assert any(f.bullae for *_, f in drawn) and any(f.emphysema for *_, f in drawn)


def test_ct_mimics_are_air_inside_the_lungs_and_never_in_the_pneumothorax() -> None:
    shape = (40, 40, 20)
    grid = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    xyz = (grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :])
    lungs = np.zeros(shape, bool)
    lungs[5:35, 5:35, 2:18] = True
    mask = np.zeros(shape, bool)
    mask[5:12, 5:35, 2:18] = True  # a pneumothorax along one side
    for seed in range(6):
        hu = np.where(lungs, -850.0, 40.0).astype(np.float32)
        hu[mask] = -1000.0
        bullae, emphysema = phantoms._draw_ct_mimics(hu, lungs, mask, xyz, np.random.default_rng(seed))
        changed = hu != np.where(mask, -1000.0, np.where(lungs, -850.0, 40.0))
        assert changed.any() == (bullae > 0 or emphysema)
        assert not (changed & ~lungs).any() and not (changed & mask).any()
        assert (hu[changed] <= -700).all()
