"""The ensemble candidate: a head on the concatenation of several backbones' cached features, ranked with them."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.common.results import BackboneResult
from tasks.data.datafolder import DataFolder
from tasks.learning.ensemble import ensemble_members, train_ensemble_head
from tasks.learning.head import HeadParams, train_head
from tasks.learning.runs import rank_backbones
from tasks.learning.shards import write_shard
from tests.prepared import make_prepared_dir



PARAMS = HeadParams(dense_units=16, dropout=0.1, learning_rate=1e-2, epochs=4, batch_size=16, patience=4, seed=3)


def _entry(name: str, cache_dir, input_size: int = 32) -> BackboneResult:
    return BackboneResult(backbone=name, weights="none", input_size=input_size, precision="float32", feature_dim=8,
                          feature_cache_dir=str(cache_dir), features_computed=0, features_reused=0, head_path="",
                          history_path="", val_accuracy=0.0, val_loss=1.0, val_auc=0.5, epochs_run=0, best_epoch=0)


def test_two_backbones_that_each_see_half_the_signal_are_beaten_by_their_ensemble(tmp_path):
    """The label is whether a + b > 0; one backbone's features carry a, the other's b: only together do they know."""
    folder = DataFolder.at(make_prepared_dir(tmp_path, {"train": 40, "validation": 25, "test": 1}))
    rows = folder.labelled_rows()
    rng = np.random.default_rng(5)
    halves = np.abs(rng.normal(0, 1, (len(rows), 2)))
    sign = np.where(rows["y"].to_numpy() == 1, 1.0, -1.0)
    a = sign * halves[:, 0] + rng.normal(0, 1.0, len(rows))  # a + b has the label's sign, each alone half of it
    b = sign * halves[:, 1] + (sign * halves[:, 0] - a)
    backbones = {}
    for name, signal in (("vgg16", a), ("resnet50", b)):
        cache = tmp_path / "features" / name
        cache.mkdir(parents=True)
        features = np.concatenate([signal[:, None], rng.normal(0, 1, (len(rows), 7))], axis=1)
        write_shard(cache, rows["sha256"].tolist(), features)
        head = train_head(folder, cache, tmp_path / "run", name, PARAMS)
        backbones[name] = _entry(name, cache).model_copy(update={key: getattr(head, key) for key in
                                                                 ("head_path", "val_auc", "val_loss", "val_accuracy")})
    members, _ = ensemble_members(backbones)
    ensemble = train_ensemble_head(folder, backbones, members, tmp_path / "run", PARAMS)
    assert ensemble.backbone == "vgg16+resnet50" and ensemble.feature_dim == 16
    assert max(entry.val_auc for entry in backbones.values()) < 0.95 <= ensemble.val_auc
    assert rank_backbones({**backbones, ensemble.backbone: ensemble})[0] == "vgg16+resnet50"


def test_an_ensemble_joins_backbones_of_one_input_size():
    assert ensemble_members({"vgg16": _entry("vgg16", "a")}) == ([], "one backbone: no ensemble")
    members, why = ensemble_members({"vgg16": _entry("vgg16", "a", 224), "inception_v3": _entry("inception_v3", "b", 299),
                                     "resnet50": _entry("resnet50", "c", 224)})
    assert members == ["vgg16", "resnet50"] and "inception_v3" in why and "224" in why
    members, why = ensemble_members({"vgg16": _entry("vgg16", "a", 224), "inception_v3": _entry("inception_v3", "b", 299)})
    assert members == [] and "share an input size" in why
