"""pneumoseg.engine.record: thresholds are tuned on the validation split only and every other split reads them."""

from __future__ import annotations

import dataclasses

import pytest

from pneumoseg.engine.flags import as_flag
from pneumoseg.engine.record import check_search_split, evaluation_postprocess, postprocessing_used
from pneumoseg.model_record import ModelRecord, PostprocessingThresholds
from pneumoseg.postprocessing import PLAIN


def _record() -> ModelRecord:
    tuned = PostprocessingThresholds(t_cls=0.3, top=0.7, min_area=25, bottom=0.4)
    return ModelRecord().with_postprocessing(tuned, "validation search")


def test_search_only_on_the_validation_split():
    check_search_split(True, "validation", "validation")
    check_search_split(False, "test", "validation")
    check_search_split("false", "test", "validation")  # as `--search_postprocessing false` arrives
    with pytest.raises(ValueError, match="tuned on the validation split \\('validation'\\) only, not on 'test'"):
        check_search_split(True, "test", "validation")
    with pytest.raises(ValueError, match="must be True or False"):
        check_search_split("no", "test", "validation")


def test_evaluation_reads_the_record_unless_it_searches():
    record = _record()
    assert evaluation_postprocess(record, search=False).thresholds == record.postprocessing
    assert evaluation_postprocess(record, search=True).thresholds == PLAIN
    used = postprocessing_used(record, search=False)
    assert used["postprocessing"] == dataclasses.asdict(record.postprocessing)
    assert used["postprocessing_source"] == "validation search"
    assert postprocessing_used(record, search=True)["postprocessing"] == dataclasses.asdict(PLAIN)


def test_flags_as_the_command_line_delivers_them():
    assert as_flag(True, "x") is True and as_flag("False", "x") is False and as_flag(" TRUE ", "x") is True
    with pytest.raises(ValueError, match="resume must be True or False, got 0"):
        as_flag(0, "resume")
