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
        "--compressed-fraction", "--monochrome1-fraction", "--workers", "--overwrite",
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
