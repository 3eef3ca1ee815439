"""Paired intervals over source images: calibrated, resampled by source, and the report's numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gara.config import BootstrapConfig
from gara.evaluate.metrics import mean_over_images
from gara.evaluate.paired import NO_DIFFERENCE, Interval, SourceBootstrap, paired_table, paired_tree
from gara.evaluate.report import _clear_degrade

TYPES = ("fog", "snow")
TRUE_DELTA = 1.0


def simulated_records(rng: np.random.Generator, n_sources: int, source_sd: float, noise_sd: float,
                      variants_per_type: int = 2, instances: int = 2) -> pd.DataFrame:
    """base and model on n_sources photos (clean + variants of two types); the model's gain on a
    photo is TRUE_DELTA + a per-photo effect (sd ``source_sd``) shared by all its variants, plus
    per-instance noise: the situation in which variants of one photo are not independent."""
    rows = []
    image_id = 0
    for source in range(n_sources):
        effect = rng.normal(0, source_sd)
        variants = [("clean", 0)] + [(t, 3) for t in TYPES for _ in range(variants_per_type)]
        for corruption, severity in variants:
            image_id += 1
            for ann in range(instances):
                base = rng.uniform(40, 80)
                gain = TRUE_DELTA + effect + rng.normal(0, noise_sd)
                for model, value in (("base", base), ("model", base + gain)):
                    rows.append({"model": model, "image_id": image_id, "source_image_id": source,
                                 "corruption": corruption, "severity": severity, "kind": "box",
                                 "ann_id": 1000 * image_id + ann, "iou": value, "dice": value})
    return pd.DataFrame(rows)


def as_independent_images(records: pd.DataFrame) -> pd.DataFrame:
    """The same records with every image its own source: what image-level resampling assumes."""
    return records.assign(source_image_id=records["image_id"])


FAST = BootstrapConfig(resamples=2000, seed=0)


def test_intervals_cover_a_known_delta_at_the_stated_rate() -> None:
    rng = np.random.default_rng(7)
    covered, image_level_covered, reps = 0, 0, 120
    for _ in range(reps):
        records = simulated_records(rng, n_sources=24, source_sd=2.0, noise_sd=0.5)
        ours = SourceBootstrap(records, FAST).difference("model", "base", "degrade", "box", "iou")
        naive = SourceBootstrap(as_independent_images(records), FAST).difference(
            "model", "base", "degrade", "box", "iou")
        covered += ours.ci_low <= TRUE_DELTA <= ours.ci_high
        image_level_covered += naive.ci_low <= TRUE_DELTA <= naive.ci_high
    # 95% intervals over 24 sources: about 0.93 in theory (percentile intervals run a little
    # narrow at this size); 120 repetitions put 3 standard errors at +-0.07.
    assert 0.85 <= covered / reps <= 1.0
    # Resampling the 4 corrupted variants of a photo as if independent halves the interval:
    # in theory it covers P(|Z| < 0.98) = 0.67 of the time.
    assert image_level_covered / reps < 0.8


def test_resampling_is_by_source_image() -> None:
    records = simulated_records(np.random.default_rng(3), n_sources=30, source_sd=2.0, noise_sd=0.2,
                                variants_per_type=4)
    ours = SourceBootstrap(records, FAST).difference("model", "base", "degrade", "box", "iou")
    naive = SourceBootstrap(as_independent_images(records), FAST).difference(
        "model", "base", "degrade", "box", "iou")
    assert ours.n_sources == 30 and naive.n_sources == 30 * 8
    assert ours.delta == pytest.approx(naive.delta)  # same data, same estimate
    # 8 corrupted variants per photo share its effect: image-level intervals are ~sqrt(8) too narrow.
    assert (ours.ci_high - ours.ci_low) > 2 * (naive.ci_high - naive.ci_low)


def test_the_estimate_is_the_reports_number_and_pairs_follow_the_sign() -> None:
    records = simulated_records(np.random.default_rng(1), n_sources=10, source_sd=1.0, noise_sd=1.0)
    boot = SourceBootstrap(records, FAST)
    for part in ("clear", "degrade"):
        diff = boot.difference("model", "base", part, "box", "iou")
        report = {m: _clear_degrade(records[records["model"] == m], ["iou"])[part]["iou"]
                  for m in ("model", "base")}
        assert diff.delta == pytest.approx(report["model"] - report["base"], abs=1e-4)  # the report rounds
        flipped = boot.difference("base", "model", part, "box", "iou")
        assert flipped.delta == pytest.approx(-diff.delta)
        assert (flipped.ci_low, flipped.ci_high) == pytest.approx((-diff.ci_high, -diff.ci_low))
    fog = boot.difference("model", "base", "fog", "box", "iou")
    only_fog = records[records["corruption"] == "fog"]
    means = {m: mean_over_images(only_fog[only_fog["model"] == m], ["iou"]).iloc[0]["iou"]
             for m in ("model", "base")}
    assert fog.delta == pytest.approx(means["model"] - means["base"])


def test_unevaluated_kinds_are_none_and_the_table_lists_every_pair() -> None:
    records = simulated_records(np.random.default_rng(2), n_sources=6, source_sd=1.0, noise_sd=1.0)
    records = pd.concat([records, records[records["model"] == "base"].assign(model="other")])
    boot = SourceBootstrap(records, FAST)
    tree = paired_tree(boot, "model", "base")
    assert tree["degrade"]["point"]["iou"] is None  # only boxes were evaluated
    assert set(tree["clear"]["box"]["dice"]) == {"delta", "ci_low", "ci_high", "n_sources"}
    table = paired_table(boot, ["base", "model", "other"], list(TYPES))
    assert len(table) == 6 * 4 * 2  # ordered pairs x (clear, degrade, fog, snow) x (iou, dice)
    same = table[(table["model"] == "other") & (table["other"] == "base")]
    assert (same[["delta", "ci_low", "ci_high"]] == 0).all().all()  # identical models: exactly 0


def test_seeded_and_described() -> None:
    records = simulated_records(np.random.default_rng(4), n_sources=8, source_sd=3.0, noise_sd=1.0)
    a = SourceBootstrap(records, FAST).difference("model", "base", "degrade", "box", "iou")
    b = SourceBootstrap(records, FAST).difference("model", "base", "degrade", "box", "iou")
    assert a == b
    assert Interval(0.5, -0.2, 1.1, 8).describe() == f"+0.50 [-0.20, +1.10] {NO_DIFFERENCE}"
    assert Interval(0.5, 0.1, 1.1, 8).describe() == "+0.50 [+0.10, +1.10]"
    assert not Interval(0.5, -0.2, 1.1, 8).measurable and Interval(-0.5, -1.0, -0.1, 8).measurable


def test_severity_bands_need_enough_source_images() -> None:
    from gara.evaluate.report import ALL_TYPES, BAND_MIN_SOURCES, severity_curves

    records = simulated_records(np.random.default_rng(5), n_sources=12, source_sd=1.0, noise_sd=1.0)
    records.loc[records["source_image_id"] == 0, "severity"] = np.where(
        records.loc[records["source_image_id"] == 0, "corruption"] == "clean", 0, 5)  # one photo at s5
    curves = severity_curves(SourceBootstrap(records, FAST), ["base", "model"], list(TYPES))
    banded = curves.dropna(subset=["iou_low"])
    assert (banded["n_sources"] >= BAND_MIN_SOURCES).all()
    assert ((banded["iou_low"] <= banded["iou"]) & (banded["iou"] <= banded["iou_high"])).all()
    clean = curves[(curves["severity"] == 0) & (curves["corruption"] == ALL_TYPES)]
    assert clean["iou_low"].notna().all() and set(clean["n_sources"]) == {12}  # 12 photos: a band
    lone = curves[curves["severity"] == 5]
    assert set(lone["n_sources"]) == {1} and lone["iou_low"].isna().all()  # one photo: no band
