"""Paired differences between models, with a bootstrap interval over source images.

Two models scored on the same evaluation set saw the same images and the same prompts, so
their difference is measured instance by instance (paired). Its uncertainty comes from which
images happened to be in the set: the interval resamples **source images** with replacement,
and every variant of a source (its clean copy, each corruption) and every instance on it
moves with it. Variants of one photo are not independent evidence; treating them as such
would give intervals that are far too narrow.

A statistic is the report's own definition (:mod:`gara.evaluate.report`): per-instance
values averaged within each image, then over the images of a group; Clear is the clean
group, Degrade the mean over corruption types of each type's mean, a type its own group.
With source weights w (how often each source was drawn), a group's mean is
``sum_s w_s S_sg / sum_s w_s N_sg`` (S: the sum of image means of source s in group g, N:
their count), so all resamples are two matrix products. A type that a resample happens not
to draw is left out of that resample's Degrade mean. With w = 1 the statistic is exactly
the report's number.

Interval: the percentile interval of ``model(w) - other(w)`` over ``resamples`` draws of w
from a seeded generator (the same draws for every comparison: common random numbers), at
``confidence`` (0.95: the 2.5th and 97.5th percentiles). An interval that contains zero
means *no measurable difference*.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gara.config import BootstrapConfig
from gara.data.corrupt import CLEAN
from gara.data.prompts import PROMPT_KINDS
from gara.evaluate.metrics import METRICS, image_means
from gara.seeding import seeded_rng

PARTS = ("clear", "degrade")
NO_DIFFERENCE = "no measurable difference"
_PAIR_KEYS = ["image_id", "kind", "ann_id"]


@dataclass(frozen=True)
class Interval:
    """A statistic (or a difference) with its bootstrap interval, on the 0-100 scale."""

    delta: float
    ci_low: float
    ci_high: float
    n_sources: int

    @property
    def measurable(self) -> bool:
        """False when the interval contains zero: no measurable difference."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, float | int]:
        return {"delta": round(self.delta, 4), "ci_low": round(self.ci_low, 4),
                "ci_high": round(self.ci_high, 4), "n_sources": self.n_sources}

    def describe(self) -> str:
        text = f"{self.delta:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"
        return text if self.measurable else f"{text} {NO_DIFFERENCE}"


def source_weights(n_sources: int, config: BootstrapConfig) -> np.ndarray:
    """(resamples, n_sources) draw counts: each row a resample of the sources with replacement."""
    rng = seeded_rng("bootstrap-sources", config.seed, n_sources)
    return rng.multinomial(n_sources, np.full(n_sources, 1.0 / n_sources), size=config.resamples)


class SourceBootstrap:
    """Per-image means of every model in ``records`` (RECORD_COLUMNS rows), laid out by source,
    ready for intervals of any model or pair of models (see the module docstring)."""

    def __init__(self, records: pd.DataFrame, config: BootstrapConfig):
        self.config = config
        self.records = records
        self.sources = np.array(sorted(records["source_image_id"].unique()))
        self.weights = source_weights(len(self.sources), config) if len(self.sources) else None
        self._means: dict[tuple[str, ...], pd.DataFrame] = {}

    # -- building blocks ------------------------------------------------------------------
    def _image_means(self, model: str, other: str | None, kind: str) -> pd.DataFrame:
        """Per image: the mean of each metric over the instances both models scored."""
        key = (model, other or "", kind)
        if key not in self._means:
            frame = self.records[self.records["kind"] == kind]
            mine = frame[frame["model"] == model]
            if other is not None:
                theirs = frame[frame["model"] == other][_PAIR_KEYS + list(METRICS)]
                if len(mine) != len(theirs):
                    raise ValueError(
                        f"{model!r} has {len(mine)} {kind} records and {other!r} {len(theirs)}: a paired "
                        "comparison needs both scored on the same instances (the same evaluation set)")
                paired = mine.merge(theirs, on=_PAIR_KEYS, suffixes=("", "_other"), validate="one_to_one")
                if len(paired) != len(mine):
                    raise ValueError(
                        f"{model!r} and {other!r} scored different {kind} instances: a paired comparison "
                        "needs the same images, instances and prompt kinds")
                mine = paired
            values = [*METRICS, *(f"{m}_other" for m in METRICS if other is not None)]
            self._means[key] = image_means(mine, values, by=["source_image_id", "corruption", "severity"])
        return self._means[key]

    def _matrices(self, means: pd.DataFrame, value: str, group: str) -> tuple[np.ndarray, np.ndarray]:
        """(sources x groups) sums of image means and image counts."""
        index = pd.Index(self.sources, name="source_image_id")
        sums = means.pivot_table(index="source_image_id", columns=group, values=value, aggfunc="sum")
        counts = means.pivot_table(index="source_image_id", columns=group, values=value, aggfunc="count")
        sums = sums.reindex(index).fillna(0.0).to_numpy()
        counts = counts.reindex(index).fillna(0.0).to_numpy()
        return sums, counts

    @staticmethod
    def _statistic(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Mean over groups of each group's weighted image mean; one value per weight row."""
        num, den = weights @ sums, weights @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        with warnings.catch_warnings():  # a resample that drew no image of a group: NaN, skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(ratio, axis=1)

    def _select(self, means: pd.DataFrame, part: str, severity: int | None) -> tuple[pd.DataFrame, str]:
        """Images of ``part`` (clear, degrade, or a corruption type) and the column that groups them."""
        clean = means["corruption"] == CLEAN
        if part == "clear":
            chosen, group = means[clean], "corruption"
        elif part == "degrade":
            chosen, group = means[~clean], "corruption"
        else:
            chosen, group = means[means["corruption"] == part], "corruption"
        if severity is not None:
            chosen = chosen[chosen["severity"] == severity]
        return chosen, group

    def _interval(self, chosen: pd.DataFrame, group: str, value: str, other_value: str | None
                  ) -> Interval | None:
        if chosen.empty or self.weights is None:
            return None
        ones = np.ones((1, len(self.sources)))
        sums, counts = self._matrices(chosen, value, group)
        estimate = self._statistic(ones, sums, counts)[0]
        resampled = self._statistic(self.weights, sums, counts)
        if other_value is not None:
            other_sums, _ = self._matrices(chosen, other_value, group)
            estimate -= self._statistic(ones, other_sums, counts)[0]
            resampled = resampled - self._statistic(self.weights, other_sums, counts)
        tail = 100 * (1 - self.config.confidence) / 2
        low, high = np.nanpercentile(resampled, [tail, 100 - tail])
        n_sources = int(chosen["source_image_id"].nunique())
        return Interval(float(estimate), float(low), float(high), n_sources)

    # -- public ---------------------------------------------------------------------------
    def difference(self, model: str, other: str, part: str, kind: str, metric: str) -> Interval | None:
        """``model - other`` on ``part`` (clear, degrade or a corruption type); None if not evaluated."""
        chosen, group = self._select(self._image_means(model, other, kind), part, None)
        return self._interval(chosen, group, metric, f"{metric}_other")

    def value(self, model: str, part: str, kind: str, metric: str, severity: int | None = None
              ) -> Interval | None:
        """One model's statistic with its interval (``delta`` holds the value itself)."""
        chosen, group = self._select(self._image_means(model, None, kind), part, severity)
        return self._interval(chosen, group, metric, None)


def paired_tree(boot: SourceBootstrap, model: str, other: str) -> dict[str, Any]:
    """``{clear|degrade: {box|point: {iou|dice: Interval dict or None}}}`` for model - other."""
    tree: dict[str, Any] = {}
    for part in PARTS:
        tree[part] = {}
        for kind in PROMPT_KINDS:
            tree[part][kind] = {}
            for metric in METRICS:
                interval = boot.difference(model, other, part, kind, metric)
                tree[part][kind][metric] = None if interval is None else interval.as_dict()
    return tree


def paired_table(boot: SourceBootstrap, models: Sequence[str], types: Sequence[str]) -> pd.DataFrame:
    """Every ordered pair of models, on Clear, Degrade and each corruption type: one row per
    (model, other, part, kind, metric) with delta, ci_low, ci_high, n_sources."""
    rows = []
    for model in models:
        for other in models:
            if other == model:
                continue
            for part in (*PARTS, *types):
                for kind in PROMPT_KINDS:
                    for metric in METRICS:
                        interval = boot.difference(model, other, part, kind, metric)
                        if interval is not None:
                            rows.append({"model": model, "other": other, "part": part, "kind": kind,
                                         "metric": metric, **interval.as_dict()})
    columns = ["model", "other", "part", "kind", "metric", "delta", "ci_low", "ci_high", "n_sources"]
    return pd.DataFrame(rows, columns=columns)
