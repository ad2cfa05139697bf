"""The model record: closed schema, round trip, network registry, weights read as data."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from pneumoseg.model_record import (
    AXCODES,
    CT,
    MAX_RECORD_BYTES,
    RADIOGRAPH,
    RECORD_FILE,
    CTPreprocessing,
    ModelRecord,
    ModelRecordError,
    NetworkSpec,
    PostprocessingThresholds,
    describe_network,
    load_state_dict,
    load_trained_model,
    unwrap_state_dict,
)
from pneumoseg.networks import SCSEUNet

SMALL = {"decoder_channels": [16, 8, 8, 4, 4], "head_channels": 4}


@pytest.fixture(scope="module")
def network() -> SCSEUNet:
    torch.manual_seed(0)
    return SCSEUNet(**SMALL).eval()


def test_round_trip_is_exact_and_canonical(network):
    record = ModelRecord.for_training(network, RADIOGRAPH, image_size=256, operating_threshold=0.4)
    again = ModelRecord.from_dict(json.loads(record.to_json()))
    assert again == record
    assert again.to_json() == record.to_json()
    assert record.kinds == (RADIOGRAPH,)
    assert record.radiograph.image_size == 256 and record.ct is None
    # defaults that ship before any tuning gate at the operating threshold
    assert record.postprocessing.t_cls == 0.4
    assert record.network.kwargs["decoder_channels"] == (16, 8, 8, 4, 4)


def test_ct_record_keeps_window_and_orientation(network):
    record = ModelRecord.for_training(network, CT, image_size=128, window=[-1000, 200], orientation="LPS")
    assert record.kinds == (CT,)
    assert record.ct == CTPreprocessing(image_size=128, window=(-1000.0, 200.0), orientation="LPS")
    assert ModelRecord.from_dict(json.loads(record.to_json())) == record
    assert "RAS" in AXCODES and "LPS" in AXCODES and len(AXCODES) == 48


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["network"]["kwargs"].update(pretrained_path="/etc/passwd"), "network/kwargs"),
        (lambda d: d["network"].update(name="os.system"), "network/name"),
        (lambda d: d["network"]["kwargs"].update(head_channels=10**6), "network/kwargs/head_channels"),
        (lambda d: d["network"]["kwargs"].update(norm="$__import__('os')"), "network/kwargs/norm"),
        (lambda d: d.update(_target_="os.system"), "(top level)"),
        (lambda d: d["preprocessing"].update(mri={"image_size": 64}), "preprocessing"),
        (lambda d: d["preprocessing"].clear(), "preprocessing"),
        (lambda d: d["preprocessing"][RADIOGRAPH].update(image_size=10**9), "preprocessing/radiograph/image_size"),
        (lambda d: d["preprocessing"][RADIOGRAPH].update(image_size="512"), "preprocessing/radiograph/image_size"),
        (lambda d: d.update(operating_threshold=1.5), "operating_threshold"),
        (lambda d: d["postprocessing"].update(min_area=-1), "postprocessing/min_area"),
        (lambda d: d.update(version=99), "version"),
    ],
)
def test_schema_is_closed_and_range_checked(network, mutate, where):
    value = ModelRecord.for_training(network).to_dict()
    mutate(value)
    with pytest.raises(ModelRecordError, match=where.replace("(", r"\(").replace(")", r"\)")):
        ModelRecord.from_dict(value)


def test_inconsistent_ranges_are_refused(network):
    value = ModelRecord.for_training(network).to_dict()
    value["preprocessing"][RADIOGRAPH].update(lower_percentile=99, upper_percentile=1)
    with pytest.raises(ModelRecordError, match="lower_percentile"):
        ModelRecord.from_dict(value)
    with pytest.raises(ModelRecordError, match="window"):
        ModelRecord.for_training(network, CT, window=[100, -100])


def test_read_refuses_oversized_and_invalid_files(tmp_path, network):
    big = tmp_path / "big.json"
    big.write_text(" " * (MAX_RECORD_BYTES + 1))
    with pytest.raises(ModelRecordError, match="bytes"):
        ModelRecord.read(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 30_000 + "]" * 30_000)
    with pytest.raises(ModelRecordError, match="not valid JSON"):
        ModelRecord.read(deep)
    with pytest.raises(FileNotFoundError, match="no model record"):
        ModelRecord.read(tmp_path / "missing.json")


def test_with_postprocessing_replaces_thresholds_and_source(network):
    record = ModelRecord.for_training(network)
    tuned = record.with_postprocessing(PostprocessingThresholds(0.3, 0.7, 10, 0.4))
    assert tuned.postprocessing == PostprocessingThresholds(0.3, 0.7, 10, 0.4)
    assert tuned.training["postprocessing_source"] == "validation search"
    assert tuned.network == record.network and tuned.digest() != record.digest()


def test_describe_and_build_give_the_same_architecture(network):
    spec = describe_network(network)
    rebuilt = spec.build()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in network.state_dict().items()
    }
    with pytest.raises(ModelRecordError, match="registry"):
        describe_network(torch.nn.Linear(2, 2))
    with pytest.raises(ModelRecordError, match="kwargs"):
        NetworkSpec("SCSEUNet", {"pretrained_path": "/tmp/x.pt"}).build()


def test_load_trained_model_from_data_only(tmp_path, network):
    (tmp_path / "models").mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in network.state_dict().items()}}, tmp_path / "models/model.pt")
    ModelRecord.for_training(network, RADIOGRAPH, 128).write(tmp_path / "models" / RECORD_FILE)
    model = load_trained_model(tmp_path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.network(x).seg, network(x).seg)
    assert not model.network.training and len(model.fingerprint) == 16
    # another record (other preprocessing) -> another fingerprint, same weights
    other = load_trained_model(tmp_path, record=ModelRecord.for_training(network, RADIOGRAPH, 256))
    assert other.weights_sha256 == model.weights_sha256 and other.fingerprint != model.fingerprint
    # weights of another architecture are refused with the file's name
    ModelRecord.for_training(SCSEUNet()).write(tmp_path / "models" / RECORD_FILE)
    with pytest.raises(ModelRecordError, match="model.pt does not fit"):
        load_trained_model(tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_weights_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Payload()}, path)
    with pytest.raises(ModelRecordError, match="weights-only"):
        load_state_dict(path)
    assert "unpickled" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelRecordError, match="weights-only"):
        load_state_dict(path)
    with pytest.raises(ModelRecordError, match="bytes"):
        load_state_dict(path, max_bytes=4)
    with pytest.raises(ModelRecordError, match="not a state dict"):
        unwrap_state_dict({"model": {"w": "text"}})


def test_frozen(network):
    record = ModelRecord.for_training(network)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.operating_threshold = 0.1  # type: ignore[misc]
