"""Per-round, per-site metrics of a federated job: a table (CSV + Markdown) and a plot (PNG).

Input: the ``pneumoseg_rounds.jsonl`` the server's :class:`~pneumoseg.federated.server.RoundRecorder` wrote.
Row ``version v`` holds what each site measured on its own validation split for the global model after ``v``
rounds (``0``: the initial model).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.federated.values import METRIC_NAMES

__all__ = ["ROUNDS_FILE", "RoundsLog", "write_report", "PLOTTED"]

ROUNDS_FILE = "pneumoseg_rounds.jsonl"
"""The round record the server's :class:`~pneumoseg.federated.server.RoundRecorder` writes in the job's run folder."""

PLOTTED: tuple[str, ...] = ("siim_dice", "positive_dice", "auc")
"""Metrics drawn in the plot (the table has all of :data:`METRIC_NAMES`)."""
MAX_LOG_BYTES = 64 * 1024 * 1024


@dataclass
class RoundsLog:
    """The parsed round record: job id, global model digests per version, site metrics per version."""

    job_id: str = ""
    values: dict[str, Any] | None = None
    global_models: dict[int, str] = field(default_factory=dict)
    metrics: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    site_results: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RoundsLog:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no round record (the server's RoundRecorder writes it in the job's run folder)"
            )
        if path.stat().st_size > MAX_LOG_BYTES:
            raise ValueError(f"{path}: larger than a round record can be")
        log = cls()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            event = record.get("event")
            if event == "start":
                log.job_id = str(record.get("job_id", ""))
                log.values = record.get("values")
            elif event == "global_model":
                log.global_models[int(record["version"])] = str(record["sha256"])
            elif event == "site_result":
                log.site_results.append(record)
                values = {k: float(v) for k, v in dict(record.get("metrics", {})).items() if k in METRIC_NAMES}
                log.metrics.setdefault(int(record["version"]), {})[str(record["site"])] = values
        return log

    @property
    def sites(self) -> list[str]:
        return sorted({site for per_site in self.metrics.values() for site in per_site})

    @property
    def versions(self) -> list[int]:
        return sorted(self.metrics)

    @property
    def final_version(self) -> int:
        """The last global model version every reporting site measured."""
        return max(self.versions) if self.versions else 0

    def final_metrics(self) -> dict[str, dict[str, float]]:
        """Each site's metrics of the final global model."""
        return dict(self.metrics.get(self.final_version, {}))

    def rows(self) -> list[dict[str, Any]]:
        """One row per (version, site): ``version``, ``site``, the metrics (``None`` where not measured)."""
        return [
            {"version": v, "site": s, **{m: self.metrics[v].get(s, {}).get(m) for m in METRIC_NAMES}}
            for v in self.versions
            for s in self.sites
        ]

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["version", "site", *METRIC_NAMES], lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow(
                {k: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}
            )
        return out.getvalue()

    def markdown(self, metrics: tuple[str, ...] = METRIC_NAMES) -> str:
        """The table as Markdown: one line per global model version and site."""
        lines = [
            "| global model after round | site | " + " | ".join(metrics) + " |",
            "| --- | --- | " + " | ".join("---" for _ in metrics) + " |",
        ]
        for row in self.rows():
            cells = ["" if row[m] is None else f"{row[m]:.3f}" for m in metrics]
            lines.append(f"| {row['version']} | {row['site']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _plot(log: RoundsLog, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], PLOTTED):
        for site in log.sites:
            points = [(v, log.metrics[v][site][metric]) for v in log.versions if metric in log.metrics[v].get(site, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=site)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("global model after round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"federated job {log.job_id}: each site's validation split", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(log: RoundsLog, out_dir: str | os.PathLike) -> Mapping[str, Path]:
    """Write ``rounds.csv``, ``rounds.md`` and ``rounds.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "rounds.csv", "markdown": out / "rounds.md", "plot": out / "rounds.png"}
    paths["csv"].write_text(log.csv_text())
    paths["markdown"].write_text(f"# Federated job {log.job_id}: per-round metrics\n\n{log.markdown()}")
    _plot(log, paths["plot"])
    return paths
