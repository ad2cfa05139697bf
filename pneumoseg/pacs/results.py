"""What goes back to the PACS for each processed scan: the DICOM SEG, a Comprehensive SR, an overlay capture.

* **SEG**: the runner's ``scans/<scan_id>/seg.dcm`` as it is (``pneumoseg infer`` writes the same file).
* **SR** (``sr.dcm``): a Comprehensive SR, TID 1500 measurement report with one TID 1501 group per scan:
  the pneumothorax probability (image level), the finding present / absent (the post-processed mask is not
  empty), and the mask area (mm², radiographs with a pixel spacing) or volume (mL, CT); the source images
  are its evidence, so it files under their study.
* **Secondary Capture** (``sc.dcm``, off by default): the overlay PNG as an RGB image in the study.

Every result's Series and SOP Instance UIDs derive from the scan and the model's fingerprint (as the
runner's SEG does): processing a scan again gives the same UIDs, so a result sent twice is the same
instance twice, never two instances.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.pacs.config import ResultSettings
from pneumoseg.pacs.pipeline import PNEUMOTHORAX_CODE, StudyResult, atomic_write, sanitize_source_header

__all__ = ["ResultFile", "build_results", "source_files"]

SR_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9903
_LOCAL_SCHEME = "99PNEUMOSEG"  # private coding scheme for the one concept no standard names


@dataclass(frozen=True)
class ResultFile:
    """A result instance on disk, for one source series (the key of "sent once")."""

    kind: str  # seg | sr | sc
    path: Path
    sop_uid: str
    series_uid: str  # of the source
    scan_id: str
    model_fingerprint: str  # of the model that made it


def source_files(study_dir: Path, row: dict[str, Any]) -> list[Path]:
    """The spooled files of a report row: ``input`` is relative to the study folder (a series: its folder;
    a frame of a multi-frame file: ``path@frameNNNN``)."""
    source = study_dir / str(row["input"]).split("@frame")[0]
    if source.is_dir():
        return sorted(p for p in source.glob("*.dcm") if not p.name.startswith("."))
    return [source]


def _headers(files: Sequence[Path]) -> list[Any]:
    """Source headers as evidence (missing Type 2 patient / study attributes added empty, as for the SEG)."""
    import pydicom

    return [sanitize_source_header(pydicom.dcmread(f, stop_before_pixels=True)).dataset for f in files]


def _uid(*entropy: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(entropy))


def _write(dataset: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))


def build_sr(row: dict[str, Any], headers: Sequence[Any], model: Any, seed: str) -> Any:
    """The Comprehensive SR of one scan's row (see the module docstring)."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    pneumothorax = CodedConcept(*PNEUMOTHORAX_CODE)
    positive = row.get("positive") == "yes"
    measurements = [
        hd.sr.Measurement(
            name=CodedConcept("PTX-PROB", _LOCAL_SCHEME, "Pneumothorax probability"),
            value=float(row["probability"]),
            unit=CodedConcept("1", "UCUM", "no units"),
        )
    ]
    if row.get("area_mm2") not in (None, ""):
        measurements.append(
            hd.sr.Measurement(name=codes.SCT.Area, value=float(row["area_mm2"]), unit=codes.UCUM.SquareMillimeter)
        )
    if row.get("volume_ml") not in (None, ""):
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(row["volume_ml"]), unit=CodedConcept("ml", "UCUM", "milliliter")
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(seed, "tracking"), identifier="Pneumothorax"),
        finding_type=pneumothorax,
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64]),
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=pneumothorax,
                value=CodedConcept("52101004", "SCT", "Present")
                if positive
                else CodedConcept("2667000", "SCT", "Absent"),
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("pneumoseg-model", model.fingerprint), name=model.name[:64], manufacturer_name="pneumoseg"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("363679005", "SCT", "Imaging"),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=list(headers),
        content=report,
        series_instance_uid=_uid(seed, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(seed, "sr-sop"),
        instance_number=1,
        manufacturer="pneumoseg",
        is_complete=True,
        series_description="Pneumothorax findings (research use)",
    )


def build_sc(overlay_png: Path, header: Any, is_volume: bool, seed: str) -> Any:
    """The overlay as an RGB Secondary Capture in the source's study."""
    import highdicom as hd
    from PIL import Image

    with Image.open(overlay_png) as image:
        rgb = np.asarray(image.convert("RGB"))
    if is_volume:
        orientation = ("L", "P")  # the overlay shows an axial slice as the DICOM slice: rows -> P, columns -> L
    else:
        value = header.get("PatientOrientation")
        # a radiograph without PatientOrientation: the chest PA convention (the SC needs one in PATIENT space)
        orientation = tuple(str(v) for v in value) if value is not None and len(value) == 2 else ("L", "F")
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_uid(seed, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=_uid(seed, "sc-sop"),
        instance_number=1,
        manufacturer="pneumoseg",
        patient_orientation=orientation,
        series_description="Pneumothorax overlay (research use)",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def build_results(result: StudyResult, study_dir: Path, settings: ResultSettings) -> list[ResultFile]:
    """The result files of every ``ok`` scan of ``result`` that ``settings`` asks for (SR and SC are written
    beside the runner's outputs in ``scans/<scan_id>/``)."""
    import pydicom

    files: list[ResultFile] = []
    for row in result.rows:
        model = result.model_for(row)
        if row.get("status") != "ok" or not row.get("series_uid") or model is None:
            continue
        scan_id, series_uid = str(row["scan_id"]), str(row["series_uid"])
        seed = f"{scan_id}|{model.fingerprint}"
        folder = result.output_dir / "scans" / scan_id
        made = functools.partial(
            ResultFile, series_uid=series_uid, scan_id=scan_id, model_fingerprint=model.fingerprint
        )
        if settings.seg and row.get("seg"):
            seg_path = result.output_dir / str(row["seg"])
            sop = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
            files.append(made("seg", seg_path, sop))
        if not (settings.sr or settings.secondary_capture):
            continue
        headers = _headers(source_files(study_dir, row))
        if settings.sr:
            sr = build_sr(row, headers, model, seed)
            files.append(made("sr", _write(sr, folder / "sr.dcm"), str(sr.SOPInstanceUID)))
        if settings.secondary_capture and row.get("overlay"):
            sc = build_sc(result.output_dir / str(row["overlay"]), headers[0], row.get("kind") == "series", seed)
            files.append(made("sc", _write(sc, folder / "sc.dcm"), str(sc.SOPInstanceUID)))
    return files
