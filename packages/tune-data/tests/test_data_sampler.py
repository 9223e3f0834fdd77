"""Samplers: one bucket per batch, repeats, rank shards, exact resume, dataset weights."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice

import pytest

from tune_data.sampler import BucketBatchSampler, DatasetTooSmallError, MultiDatasetSampler, dataset_weights

BUCKETS = {
    (512, 512): [f"sq{i}" for i in range(10)],
    (768, 512): [f"wide{i}" for i in range(7)],
    (512, 768): [f"tall{i}" for i in range(2)],  # smaller than a batch: never used
}


def bucket_of(item):
    return next(key for key, items in BUCKETS.items() if item in items)


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_every_batch_comes_from_one_bucket_and_tails_are_dropped():
    sampler = BucketBatchSampler(BUCKETS, 3, seed=1)
    assert sampler.batches_per_epoch() == 3 + 2  # 10 // 3 + 7 // 3
    epoch = take(sampler, sampler.batches_per_epoch())
    assert all(len(batch) == 3 for batch in epoch)
    assert all(len({bucket_of(item) for item in batch}) == 1 for batch in epoch)
    seen = [item for batch in epoch for item in batch]
    assert len(seen) == len(set(seen)) == 15  # each image at most once per epoch
    assert sampler.state_dict() == {"epoch": 1, "position": 0}


def test_repeats_show_each_item_one_plus_repeats_times():
    sampler = BucketBatchSampler({"only": ["a", "b", "c", "d"]}, 2, seed=0, repeats=2)
    assert sampler.batches_per_epoch() == 6
    counts = Counter(item for batch in take(sampler, 6) for item in batch)
    assert counts == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_order_is_seeded_and_changes_between_epochs_without_touching_global_random():
    random.seed(123)
    before = random.getstate()
    a = take(BucketBatchSampler(BUCKETS, 2, seed=5), 16)
    assert random.getstate() == before
    assert a == take(BucketBatchSampler(BUCKETS, 2, seed=5), 16)
    assert a != take(BucketBatchSampler(BUCKETS, 2, seed=6), 16)
    per_epoch = BucketBatchSampler(BUCKETS, 2, seed=5).batches_per_epoch()
    assert a[:per_epoch] != a[per_epoch : 2 * per_epoch]


def test_rank_shards_are_disjoint_and_equally_long():
    buckets = {"a": list(range(30)), "b": list(range(100, 117))}
    shards = [BucketBatchSampler(buckets, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    lengths = {s.batches_per_epoch() for s in shards}
    assert lengths == {(7 + 4) // 3}
    seen = [[item for batch in take(s, s.batches_per_epoch()) for item in batch] for s in shards]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(seen[i]) & set(seen[j])
    single = BucketBatchSampler(buckets, 4, seed=3)
    whole = {item for batch in take(single, single.batches_per_epoch()) for item in batch}
    assert set().union(*map(set, seen)) <= whole


def test_restored_sampler_yields_exactly_the_remaining_sequence():
    original = BucketBatchSampler(BUCKETS, 2, seed=9, repeats=1)
    per_epoch = original.batches_per_epoch()
    take(original, per_epoch + 3)  # into the second epoch
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 3}
    expected = take(original, 2 * per_epoch)
    restored = BucketBatchSampler(BUCKETS, 2, seed=9, repeats=1)
    restored.load_state_dict(state)
    assert take(restored, 2 * per_epoch) == expected


def test_state_that_does_not_fit_is_refused():
    sampler = BucketBatchSampler(BUCKETS, 2)
    with pytest.raises(ValueError, match="does not fit"):
        sampler.load_state_dict({"epoch": 0, "position": 10_000})


def test_too_small_dataset_names_buckets_and_batch_size():
    with pytest.raises(DatasetTooSmallError) as info:
        BucketBatchSampler({(512, 512): ["a", "b"], (768, 512): ["c"]}, 4, dataset_id="pets")
    message = str(info.value)
    assert message.startswith("dataset 'pets' is too small for batch_size 4")
    assert "512x512: 2, 768x512: 1" in message


def test_too_few_batches_for_all_ranks_is_too_small():
    with pytest.raises(DatasetTooSmallError, match="1 batches per epoch for 2 processes"):
        BucketBatchSampler({"a": [1, 2]}, 2, rank=0, world_size=2, dataset_id="pets")


def test_dataset_weights_are_roughly_respected():
    samplers = {
        "big": BucketBatchSampler({"a": list(range(8))}, 2, dataset_id="big"),
        "small": BucketBatchSampler({"a": list(range(100, 104))}, 2, dataset_id="small"),
        "off": BucketBatchSampler({"a": [7, 8]}, 2, dataset_id="off"),
    }
    multi = MultiDatasetSampler(samplers, {"big": 3.0, "small": 1.0, "off": 0.0}, seed=4)
    counts = Counter(name for name, _ in islice(iter(multi), 4000))
    assert counts["off"] == 0
    assert 0.72 < counts["big"] / 4000 < 0.78
    for name, batch in islice(iter(multi), 50):
        assert set(batch) <= set(samplers[name]._buckets["a"])


def test_multi_dataset_sampler_resumes_exactly():
    def build():
        return MultiDatasetSampler(
            {
                "a": BucketBatchSampler(BUCKETS, 2, seed=1, dataset_id="a"),
                "b": BucketBatchSampler({"x": list(range(9))}, 3, seed=2, dataset_id="b"),
            },
            {"a": 1.0, "b": 2.0},
            seed=11,
        )

    original = build()
    take(original, 17)
    state = original.state_dict()
    expected = take(original, 40)
    restored = build()
    restored.load_state_dict(state)
    assert take(restored, 40) == expected


def test_weights_must_match_datasets():
    sampler = BucketBatchSampler({"a": [1, 2]}, 2)
    with pytest.raises(ValueError, match=r"missing \['a'\], unknown \['b'\]"):
        MultiDatasetSampler({"a": sampler}, {"b": 1.0})


def test_simpletuner_weighting_modes():
    probabilities, sizes = {"a": 1.0, "b": 0.5}, {"a": 10, "b": 100}
    assert dataset_weights(probabilities, sizes, mode="auto") == {"a": 10.0, "b": 50.0}
    assert dataset_weights(probabilities, sizes, mode="uniform") == {"a": 1.0, "b": 0.5}


def test_oversubscription_raises_repeats_just_enough_for_every_rank():
    buckets = {(512, 512): ["a", "b"], (768, 512): ["c"]}
    with pytest.raises(DatasetTooSmallError, match="allow_dataset_oversubscription"):
        BucketBatchSampler(buckets, 4, world_size=2, dataset_id="pets")
    # 4 x 2 = 8 samples a step: the 2-image bucket needs 1 + repeats >= 4 to give each rank a batch
    # of 4 (2 x 4 = 8 copies -> 2 batches); 3 repeats is the least that does.
    sampler = BucketBatchSampler(buckets, 4, world_size=2, rank=1, dataset_id="pets", oversubscribe=True)
    assert (sampler.oversubscribed_from, sampler.repeats, sampler.batches_per_epoch()) == (0, 3, 1)
    assert all(len(batch) == 4 for batch in take(sampler, 3))
    # Big enough already: nothing changes.
    plain = BucketBatchSampler(BUCKETS, 3, repeats=1, oversubscribe=True)
    assert (plain.oversubscribed_from, plain.repeats) == (None, 1)
