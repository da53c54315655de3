"""Anomaly scoring with Grad-AMap filter scores (thesis chapter 6), in pure numpy.

Build per-class training distributions (:func:`build_store`, sharded with
:func:`merge_stores`), calibrate the verdict on held-out data (:func:`calibrate`,
:func:`save_calibration`), then load and score at serving time::

    store = load_store("store/", model_name="fashion-scenes-resnet", model_version="1")
    scorer = Scorer(store)
    batch = scorer.score(alpha, classes)      # alpha (B, K) float32, classes (B,) int
    batch = scorer.score(alpha, classes, features)  # + pooled features (B, K): the five-test verdict
    result = batch.sample(0)                  # SampleScore: flags, β, verdict, reasons
    filters, exceedance = batch.surprising.top(8)  # (B, 8) arrays: the most surprising filters
"""

from explainserve.anomaly.build import build_store, default_build_time, shard_classes
from explainserve.anomaly.calibration import calibrate, save_calibration
from explainserve.anomaly.feature_tests import FEATURE_TESTS, FeatureTests
from explainserve.anomaly.merge import merge_stores
from explainserve.anomaly.scorer import (ANOMALOUS, MAX_FLAGS, NORMAL, BatchScores, FeatureShare, FilterFlag, Reason,
                                         SampleScore, Scorer, region_flag)
from explainserve.anomaly.store import DistributionStore, StoreError, StoreMeta, load_store

__all__ = [
    "ANOMALOUS", "FEATURE_TESTS", "MAX_FLAGS", "NORMAL", "BatchScores", "DistributionStore", "FeatureShare",
    "FeatureTests", "FilterFlag", "Reason",
    "SampleScore", "Scorer", "StoreError", "StoreMeta", "build_store", "calibrate", "default_build_time",
    "load_store", "merge_stores", "region_flag", "save_calibration", "shard_classes",
]
