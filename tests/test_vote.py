"""kNN voting, rank roll-up and the unknown flag, against hand-computed values."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
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
    with pytest.raises(ValueError, match="k must be a whole number of at least 1, got 0"):
        VoteConfig(k=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        VoteConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown_threshold must be in"):
        VoteConfig(unknown_threshold=1.5)


@pytest.mark.parametrize(("given", "said"), [
    ({"k": 2.5}, "k must be a whole number of at least 1, got 2.5"),
    ({"k": True}, "k must be a whole number of at least 1, got True"),
    ({"temperature": math.inf}, "temperature must be a finite number > 0, got inf"),
    ({"temperature": math.nan}, "temperature must be a finite number > 0, got nan"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"unknown_threshold": math.nan}, "unknown_threshold must be in"),
])
def test_a_vote_config_refuses_a_fractional_k_and_a_temperature_that_is_not_finite(given, said):
    """Walk-tiny 12: VoteConfig(k=2.5) and VoteConfig(temperature=inf) were accepted."""
    with pytest.raises(ValueError, match=re.escape(said)):
        VoteConfig(**given)
    assert VoteConfig(k=np.int64(5), temperature=np.float32(0.05)).k == 5  # numpy numbers (a probe's settings)


@pytest.mark.parametrize(("temperature", "said"), [
    (0, "temperature must be a finite number > 0, got 0"),
    (-1.0, "temperature must be a finite number > 0, got -1.0"),
    (math.inf, "temperature must be a finite number > 0, got inf"),
    (math.nan, "temperature must be a finite number > 0, got nan"),
])
def test_knn_vote_refuses_a_temperature_that_is_not_a_finite_number_above_0(temperature, said):
    """Walk-tiny 12: used directly, knn_vote took temperature 0 (ZeroDivisionError) and -1 (the vote inverted)."""
    with pytest.raises(ValueError, match=re.escape(said)):
        knn_vote([N("a b", 0.9), N("c d", 0.5)], temperature)


def test_knn_vote_refuses_nan_similarities_and_leaves_out_padding():
    """Walk-tiny 12: NaN similarities gave NaN scores; a search's -inf padding (no reference) gave NaN scores when
    every neighbour was padding. Padding weighs nothing (no answer when all of it is); NaN is an error."""
    with pytest.raises(ValueError, match="similarities must be numbers, got NaN: the embeddings compared were not "
                       "finite"):
        knn_vote([N("a b", 0.9), N("c d", math.nan)], 0.05)
    assert knn_vote([N("a b", -math.inf), N("c d", -math.inf)], 0.05) == {}
    assert knn_vote([N("a b", 0.9), N("c d", -math.inf)], 0.05) == {"a b": 1.0, "c d": 0.0}


@pytest.mark.parametrize("top", [0, -1, 2.0, True])
def test_top_k_refuses_a_top_that_is_not_a_whole_number_of_at_least_1(top):
    """Walk-tiny 12: top=-1 acted as the slice [:-1] (all but the last species), top=0 gave no prediction."""
    with pytest.raises(ValueError, match=re.escape(f"top must be a whole number of at least 1, got {top!r}")):
        top_k({"a b": 0.6, "c d": 0.4}, top)
