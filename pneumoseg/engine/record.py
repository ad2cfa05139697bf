"""The model record in the engines: training writes it, evaluation checks it and stores its tuned thresholds.

See :mod:`pneumoseg.model_record`. Post-processing is tuned on the validation split only
(:func:`check_search_split`); any other split is evaluated with the values the record holds, so a test
split's numbers are measured with thresholds chosen without it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from pneumoseg.engine.distributed import is_main_process
from pneumoseg.engine.flags import as_flag
from pneumoseg.model_record import ModelRecord, PostprocessingThresholds
from pneumoseg.postprocessing import DEFAULT_GRID, PLAIN, DualOutputPostprocess, PostprocessingSearch

__all__ = [
    "ModelRecordWriter",
    "PostprocessingSearchHandler",
    "check_record",
    "check_search_split",
    "evaluation_postprocess",
    "postprocessing_used",
]

logger = logging.getLogger(__name__)


class ModelRecordWriter:
    """Write the model record (``models/model_record.json``) when the engine starts (rank 0): the weights
    the run will save are then never without the record of how they must be fed.

    Args:
        record: the record (``ModelRecord.for_training(@network_def, @image_kind, @image_size, ...)``).
        path: where to write it (beside the weights).
    """

    def __init__(self, record: ModelRecord, path: str) -> None:
        self.record = record
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            self.record.write(self.path)
            logger.info("model record written: %s", self.path)


def check_record(record: ModelRecord, image_kind: str, image_size: int) -> None:
    """For ``evaluate.json``: the image kind and input size it was given must be the record's (they are read
    from it; an explicit ``--image_size`` that disagrees is refused, never silently used)."""
    preprocessing = record.preprocessing.get(image_kind)
    if preprocessing is None:
        raise ValueError(f"the model record has no {image_kind} preprocessing: the model was trained on {record.kinds}")
    if int(image_size) != preprocessing.image_size:
        raise ValueError(
            f"image_size {image_size} conflicts with the model record ({image_kind} trained at "
            f"{preprocessing.image_size}); leave --image_size out: evaluation reads it from the record"
        )


def check_search_split(search: bool, eval_split: str, val_split: str) -> None:
    """Post-processing and the image gate are tuned on the validation split only: a search on any other split
    (e.g. ``test``) would report numbers measured on the images the thresholds were chosen on."""
    if as_flag(search, "search_postprocessing") and eval_split != val_split:
        raise ValueError(
            f"post-processing is tuned on the validation split ({val_split!r}) only, not on {eval_split!r}: "
            "evaluate the validation split first (it stores the tuned values in the model record), then "
            f"{eval_split!r} with --search_postprocessing False (the default for any split but val_split)"
        )


def evaluation_postprocess(record: ModelRecord, search: bool) -> DualOutputPostprocess:
    """The rule an evaluation applies: plain thresholding while searching (the search reports its own
    "after"), otherwise the record's values."""
    searching = as_flag(search, "search_postprocessing")
    return DualOutputPostprocess.from_thresholds(PLAIN if searching else record.postprocessing)


def postprocessing_used(record: ModelRecord, search: bool) -> dict[str, Any]:
    """What an evaluation's report says of the thresholds behind its ``val_*`` metrics and where they came from."""
    if as_flag(search, "search_postprocessing"):
        return {
            "postprocessing": dataclasses.asdict(PLAIN),
            "postprocessing_source": "plain 0.5 thresholds while searching (the values found: pp_*)",
        }
    return {
        "postprocessing": dataclasses.asdict(record.postprocessing),
        "postprocessing_source": record.training.get("postprocessing_source", "default"),
    }


class PostprocessingSearchHandler:
    """Collect post-processing statistics during evaluation; at completion search the thresholds, record
    ``siim_dice_before`` / ``siim_dice_after`` (and the values) in ``engine.state.metrics`` and write them
    into the model record's ``postprocessing`` (``record_file``: the one home of the thresholds inference
    uses).

    Args:
        record_file: the model record to update (``models/model_record.json``); ``None``: metrics only.
        grid: optional grid override per parameter (see :data:`pneumoseg.postprocessing.DEFAULT_GRID`).
        baseline: the thresholds the "before" Dice is computed with (default :data:`~pneumoseg.postprocessing.PLAIN`);
            its values are added to the grid if missing.
        enabled: ``False`` makes the handler a no-op.
    """

    def __init__(
        self,
        record_file: str | None = None,
        grid: Mapping[str, Sequence[float]] | None = None,
        baseline: PostprocessingThresholds = PLAIN,
        enabled: bool = True,
    ) -> None:
        self.enabled = as_flag(enabled, "search_postprocessing")
        self.record_file = record_file
        self.baseline = baseline
        merged = {k: list((grid or {}).get(k, DEFAULT_GRID[k])) for k in DEFAULT_GRID}
        for name in ("t_cls", "top", "min_area", "bottom"):
            value = getattr(self.baseline, name)
            if value not in merged[name]:
                merged[name] = sorted([*merged[name], value])
        self.search = PostprocessingSearch(merged)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, lambda _: self.search.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        self.search.update(out["seg_prob"], out["pred_cls"], out["label"])

    def _finish(self, engine: Engine) -> None:
        stats = self.search.gather()
        chosen, best, summary = self.search.search(stats)
        before = self.search.dice(stats, self.baseline)
        engine.state.metrics.update(
            siim_dice_before=before,
            siim_dice_after=best,
            pp_t_cls=chosen.t_cls,
            pp_top=chosen.top,
            pp_min_area=chosen.min_area,
            pp_bottom=chosen.bottom,
            pp_images=summary["images"],
        )
        logger.info("post-processing search: %s, SIIM Dice %.4f -> %.4f", chosen, before, best)
        if self.record_file and is_main_process():
            ModelRecord.read(self.record_file).with_postprocessing(chosen, "validation search").write(self.record_file)
