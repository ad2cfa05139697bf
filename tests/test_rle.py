"""Tests for pneumoseg.data.rle: SIIM relative RLE, absolute RLE, SIIM CSV files, decode transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pneumoseg.data import rle as rle_module
from pneumoseg.data.rle import decode_siim_rle, encode_siim_rle, read_siim_csv, write_siim_csv


def _reference_relative_rle(mask: np.ndarray) -> str:
    """Independent slow encoder (pixel loop over the transposed mask), keeping a run at the last pixel."""
    flat = mask.T.ravel()
    pairs, prev_end, i = [], 0, 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            pairs += [i - prev_end, j - i]
            prev_end, i = j, j
        else:
            i += 1
    return " ".join(map(str, pairs)) if pairs else "-1"


def test_worked_example_exact():
    mask = np.zeros((1024, 1024), bool)
    mask[0, 0] = mask[1, 0] = mask[0, 1] = True
    assert encode_siim_rle(mask) == "0 2 1022 1"
    np.testing.assert_array_equal(decode_siim_rle("0 2 1022 1", 1024, 1024), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 3), (3, 5), (16, 16), (31, 64), (64, 17)])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_random_round_trip_matches_reference(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    for _ in range(5):
        mask = rng.random(shape) < density
        text = encode_siim_rle(mask)
        assert text == _reference_relative_rle(mask)
        decoded = decode_siim_rle(text, *shape)
        assert decoded.dtype == bool and decoded.shape == shape
        np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (1024, 1024)])
def test_empty_and_full(shape):
    h, w = shape
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    assert encode_siim_rle(empty) == "-1"
    assert not decode_siim_rle("-1", h, w).any()
    assert encode_siim_rle(full) == f"0 {h * w}"
    assert decode_siim_rle(f"0 {h * w}", h, w).all()


def test_runs_at_first_and_last_pixel():
    mask = np.zeros((5, 4), bool)
    mask[0, 0] = True  # flat index 0
    mask[3:, 3] = True  # last column, last two rows: flat 18, 19 (touches the end)
    assert encode_siim_rle(mask) == "0 1 17 2"
    np.testing.assert_array_equal(decode_siim_rle("0 1 17 2", 5, 4), mask)
    only_last = np.zeros((5, 4), bool)
    only_last[-1, -1] = True
    assert encode_siim_rle(only_last) == "19 1"


def test_column_major_order():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = True  # column 1 row 0 -> flat index 1 * H + 0 = 3
    assert encode_siim_rle(mask) == "3 1"
    assert decode_siim_rle("3 1", 3, 4)[0, 1]


def test_multiple_rows_are_unioned_and_minus_one_ignored():
    h, w = 8, 9
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[1:3, 1:3] = True
    b[2:6, 5:8] = True
    rows = [encode_siim_rle(a), " -1", encode_siim_rle(b)]
    np.testing.assert_array_equal(decode_siim_rle(rows, h, w), a | b)
    assert not decode_siim_rle(["-1", "-1"], h, w).any()
    assert not decode_siim_rle([], h, w).any()


def test_channel_first_mask_accepted():
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, 2, 1] = 1.0
    assert encode_siim_rle(mask) == encode_siim_rle(mask[0] > 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 2 5", "odd number of tokens"),
        ("0 -2", "negative"),
        ("1.5 2", "not an integer"),
        ("0 x", "not an integer"),
        ("10 7", "by 1 pixels"),  # 4x4 image: run ends at 17 > 16
        ("0 10 1 6", "by 1 pixels"),  # second run (relative) ends at 17
        ("", "blank"),
    ],
)
def test_decode_validation(text, message):
    with pytest.raises(ValueError, match=message):
        decode_siim_rle(text, 4, 4)


def test_decode_error_names_row():
    with pytest.raises(ValueError, match="RLE row 1"):
        decode_siim_rle(["0 1", "0 99"], 4, 4)


def test_absolute_encoding_only_when_asked():
    mask = np.zeros((6, 5), bool)
    mask[1:3, 0] = True  # flat 1, 2
    mask[4, 2] = True  # flat 16
    assert encode_siim_rle(mask) == "1 2 13 1"
    assert encode_siim_rle(mask, encoding="absolute") == "1 2 16 1"
    assert encode_siim_rle(mask, encoding="absolute", one_based=True) == "2 2 17 1"
    np.testing.assert_array_equal(decode_siim_rle("1 2 16 1", 6, 5, encoding="absolute"), mask)
    one_based = decode_siim_rle("2 2 17 1", 6, 5, encoding="absolute", one_based=True)
    np.testing.assert_array_equal(one_based, mask)
    # the same string read with the default (relative) codec is a different mask: no guessing
    assert not np.array_equal(decode_siim_rle("1 2 16 1", 6, 5), mask)
    with pytest.raises(ValueError, match="one_based"):
        encode_siim_rle(mask, one_based=True)
    with pytest.raises(ValueError, match="unknown RLE encoding"):
        decode_siim_rle("1 2", 6, 5, encoding="relative")
    with pytest.raises(ValueError, match="1-based"):
        decode_siim_rle("0 2", 6, 5, encoding="absolute", one_based=True)


def test_absolute_round_trip_random():
    rng = np.random.default_rng(3)
    for shape in [(7, 3), (12, 20)]:
        mask = rng.random(shape) < 0.4
        for one_based in (False, True):
            text = encode_siim_rle(mask, encoding="absolute", one_based=one_based)
            decoded = decode_siim_rle(text, *shape, encoding="absolute", one_based=one_based)
            np.testing.assert_array_equal(decoded, mask)


def test_read_stage1_csv_with_leading_spaces(tmp_path):
    path = tmp_path / "train-rle.csv"
    path.write_text("ImageId, EncodedPixels\n1.2.3, -1\n1.2.4, 0 2 1022 1\n1.2.4, 5000 3\n1.2.5, -1\n")
    rows = read_siim_csv(path)
    assert list(rows) == ["1.2.3", "1.2.4", "1.2.5"]
    assert rows["1.2.3"] == ["-1"]
    assert rows["1.2.4"] == ["0 2 1022 1", "5000 3"]


def test_read_stage2_csv_without_spaces(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ImageId,EncodedPixels\r\n9.8.7,-1\r\n9.8.6,3 1\r\n")
    assert read_siim_csv(path) == {"9.8.7": ["-1"], "9.8.6": ["3 1"]}


def test_read_csv_errors_name_file(tmp_path):
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("id,rle\n1,-1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_siim_csv(bad_header)
    bad_row = tmp_path / "bad_row.csv"
    bad_row.write_text("ImageId,EncodedPixels\n1,-1\n2,3 1,7\n")
    with pytest.raises(ValueError, match="bad_row.csv:3"):
        read_siim_csv(bad_row)


@pytest.mark.parametrize(
    "style, header", [("stage1", "ImageId, EncodedPixels"), ("stage2", "ImageId,EncodedPixels")]
)
def test_write_then_read_round_trip(tmp_path, style, header):
    rows = {"a.1": ["-1"], "a.2": ["0 2 1022 1", "7 3"], "a.3": ["4 4"]}
    path = tmp_path / "out.csv"
    write_siim_csv(path, rows, style=style)
    lines = path.read_text().splitlines()
    assert lines[0] == header
    assert lines[2] == ("a.2, 0 2 1022 1" if style == "stage1" else "a.2,0 2 1022 1")
    assert read_siim_csv(path) == rows


def test_write_default_is_stage1(tmp_path):
    path = tmp_path / "out.csv"
    write_siim_csv(path, {"x": ["-1"]})
    assert path.read_text() == "ImageId, EncodedPixels\nx, -1\n"


def test_array_transform():
    torch = pytest.importorskip("torch")
    transform = rle_module.DecodeSIIMRLE()
    out = transform(["0 2", "7 1"], (4, 3))
    assert out.shape == (1, 4, 3) and out.dtype == torch.float32
    expected = decode_siim_rle(["0 2", "7 1"], 4, 3)
    np.testing.assert_array_equal(out[0].numpy() > 0, expected)


def test_dict_transform_takes_shape_and_meta_from_image():
    torch = pytest.importorskip("torch")
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([0.5, 0.7, 1.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.zeros(1, 6, 5), affine=affine, meta={"filename_or_obj": "img.dcm"})
    mask = np.zeros((6, 5), bool)
    mask[2:4, 1:3] = True
    data = {"image": image, "label_rle": [encode_siim_rle(mask)]}
    out = rle_module.DecodeSIIMRLEd(keys="label_rle", ref_key="image", output_key="label")(data)
    label = out["label"]
    assert isinstance(label, MetaTensor) and label.shape == (1, 6, 5)
    np.testing.assert_array_equal(label[0].numpy() > 0, mask)
    assert torch.equal(label.affine, affine)
    assert label.meta["filename_or_obj"] == "img.dcm"
    assert out["label_rle"] == data["label_rle"]  # input kept
    with pytest.raises(ValueError, match="img.dcm"):
        rle_module.DecodeSIIMRLEd()({"image": image, "label_rle": ["0 31"]})


def test_transforms_pickle_by_name():
    transform = rle_module.DecodeSIIMRLEd(keys="label_rle")
    clone = pickle.loads(pickle.dumps(transform))
    assert type(clone) is rle_module.DecodeSIIMRLEd


def test_validate_without_decoding():
    from pneumoseg.data.rle import validate_siim_rle

    assert validate_siim_rle(["-1"], 4, 4) == 0
    assert validate_siim_rle(["0 2", "3 5"], 4, 4) == 7
    with pytest.raises(ValueError, match="by 4 pixels"):
        validate_siim_rle("0 10 2 8", 4, 4)


def test_codec_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pneumoseg.data.rle as r; r.encode_siim_rle([[1]]); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
