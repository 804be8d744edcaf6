"""kNN voting, rank roll-up and the unknown flag, against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from retrieval.vote import Rank, VoteConfig, knn_vote, parse_rank, rollup, top_k, venomous_probability


@dataclass
class N:
    species: str
    similarity: float


def test_weighted_vote_matches_hand_computation():
    ns = [N("Naja haje", 0.9), N("Natrix maura", 0.8), N("Naja haje", 0.7)]
    t = 0.1
    w = {"Naja haje": math.exp(0.9 / t) + math.exp(0.7 / t), "Natrix maura": math.exp(0.8 / t)}
    z = sum(w.values())
    scores = knn_vote(ns, t)
    assert list(scores) == ["Naja haje", "Natrix maura"]
    assert scores["Naja haje"] == pytest.approx(w["Naja haje"] / z)
    assert scores["Natrix maura"] == pytest.approx(w["Natrix maura"] / z)
    assert sum(scores.values()) == pytest.approx(1.0)


def test_low_temperature_trusts_the_nearest_and_high_temperature_counts_votes():
    ns = [N("a b", 0.90), N("c d", 0.85), N("c d", 0.84)]
    assert max(knn_vote(ns, 0.001), key=knn_vote(ns, 0.001).get) == "a b"
    assert max(knn_vote(ns, 10.0), key=knn_vote(ns, 10.0).get) == "c d"


def test_empty_vote_and_no_overflow():
    assert knn_vote([], 0.05) == {}
    scores = knn_vote([N("a b", 1.0), N("c d", -1.0)], 1e-4)  # exp(1e4) would overflow without shifting
    assert scores["a b"] == pytest.approx(1.0)


def test_rollup_to_genus_and_family():
    scores = {"Naja haje": 0.5, "Naja nubiae": 0.2, "Natrix maura": 0.3}
    genus = {"Naja haje": "Naja", "Naja nubiae": "Naja", "Natrix maura": "Natrix"}
    family = {"Naja haje": "Elapidae", "Naja nubiae": "Elapidae", "Natrix maura": None}
    assert rollup(scores, genus, Rank.GENUS) == pytest.approx({"Naja": 0.7, "Natrix": 0.3})
    assert rollup(scores, family, Rank.FAMILY) == pytest.approx({"Elapidae": 0.7, "unknown family": 0.3})
    assert list(rollup(scores, genus, Rank.SPECIES)) == ["Naja haje", "Natrix maura", "Naja nubiae"]
    assert top_k(scores, 2) == [("Naja haje", 0.5), ("Natrix maura", 0.3)]


def test_venomous_probability():
    scores = {"Naja haje": 0.6, "Natrix maura": 0.4}
    assert venomous_probability(scores, {"Naja haje": True, "Natrix maura": False}) == pytest.approx(0.6)
    assert venomous_probability(scores, {}) is None


def test_venomous_probability_counts_the_recorded_venomous_share_beside_unrecorded_species():
    """Walk s55 M02: one candidate of unrecorded status must not drop the whole venomous share (a 93% cobra then
    read 0% venomous, and its answer 'unlikely'); None only when no candidate records a status."""
    scores = {"Naja haje": 0.93, "Bufo bufo": 0.07}
    assert venomous_probability(scores, {"Naja haje": True, "Bufo bufo": None}) == pytest.approx(0.93)
    assert venomous_probability(scores, {"Naja haje": True}) == pytest.approx(0.93)  # a species the map lacks
    assert venomous_probability(scores, {"Naja haje": False, "Bufo bufo": None}) == 0.0
    assert venomous_probability(scores, {"Naja haje": None, "Bufo bufo": None}) is None


def test_rank_and_config_validation():
    assert parse_rank("Genus") is Rank.GENUS
    with pytest.raises(ValueError, match="unknown rank 'order'; choose one of species, genus, family"):
        parse_rank("order")
    with pytest.raises(ValueError, match="k must be at least 1"):
        VoteConfig(k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        VoteConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown_threshold must be in"):
        VoteConfig(unknown_threshold=1.5)
