"""Read-ahead of cached batches: same batches, same order, same resume point, bounded, errors surface."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tune_data.cache import TensorCache  # noqa: E402
from tune_data.prefetch import ReadAheadSampler  # noqa: E402
from tune_data.sampler import BucketBatchSampler, MultiDatasetSampler  # noqa: E402


def make_data(tmp_path, *, compress=False):
    """Two datasets of cached 'latents' (one entry per item, its value = its index) and a sampler."""
    caches, buckets = {}, {}
    for name, count in (("a", 7), ("b", 5)):
        cache = TensorCache(tmp_path / name, "latents", {"d": name}, compress_disk_cache=compress)
        items = [f"{name}{i}" for i in range(count)]
        for index, item in enumerate(items):
            cache.save(cache.key(item, ""), {"latents": torch.full((4, 8, 8), float(index))})
        caches[name] = cache
        buckets[name] = {(64, 64): items[:4], (64, 32): items[4:]}
    return caches, buckets


def make_sampler(buckets, seed=3):
    samplers = {name: BucketBatchSampler(b, 2, seed=seed, repeats=1, dataset_id=name) for name, b in buckets.items()}
    return MultiDatasetSampler(samplers, {"a": 2.0, "b": 1.0}, seed=seed)


def reads_of(caches):
    def reads(drawn):
        name, batch = drawn
        return [(caches[name], caches[name].key(item, "")) for item in batch]

    return reads


def run(sampler, caches, steps, load):
    out = []
    for _ in range(steps):
        name, batch = sampler.next_batch()
        latents = torch.stack([load(caches[name], caches[name].key(item, ""))["latents"] for item in batch])
        out.append((name, tuple(batch), latents, sampler.state_dict()))
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_read_ahead_gives_the_same_batches_tensors_and_positions_as_reading_in_place(tmp_path, compress):
    caches, buckets = make_data(tmp_path, compress=compress)
    plain = run(make_sampler(buckets), caches, 24, lambda cache, key: cache.load(key))  # several epochs
    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=3, workers=2)
    prefetched = run(ahead, caches, 24, ahead.load)
    ahead.close()
    assert [(n, b, s) for n, b, _, s in prefetched] == [(n, b, s) for n, b, _, s in plain]
    for (_, _, got, _), (_, _, want, _) in zip(prefetched, plain):
        assert torch.equal(got, want)


def test_resuming_from_its_state_continues_with_the_next_batch_not_the_ones_read_ahead(tmp_path):
    caches, buckets = make_data(tmp_path)
    reference = make_sampler(buckets)
    expected = [reference.next_batch() for _ in range(15)]

    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=4)
    taken = [ahead.next_batch() for _ in range(6)]
    assert taken == expected[:6]
    state = ahead.state_dict()
    assert ahead.sampler.state_dict() != state  # the wrapped sampler has drawn 4 batches further

    resumed = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=4)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(9)] == expected[6:]
    ahead.load_state_dict(state)  # set back in place: the batches drawn ahead are forgotten
    assert [ahead.next_batch() for _ in range(9)] == expected[6:]


def test_reading_ahead_is_bounded_and_happens_on_the_worker_while_the_caller_works(tmp_path, monkeypatch):
    caches, buckets = make_data(tmp_path)
    readers: dict[str, str] = {}
    real_read = TensorCache.read

    def recording_read(self, key):
        readers[key] = threading.current_thread().name
        return real_read(self, key)

    monkeypatch.setattr(TensorCache, "read", recording_read)
    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=2)
    name, batch = ahead.next_batch()
    # Drawn: this batch and two more, never further ahead.
    assert ahead.sampler.state_dict()["step"] - ahead.state_dict()["step"] == 2
    upcoming = [drawn for drawn, _, _ in ahead._ahead]
    deadline = time.monotonic() + 5
    wanted = {caches[n].key(item, "") for n, b in [(name, batch), *upcoming] for item in b}
    while not wanted <= readers.keys() and time.monotonic() < deadline:
        time.sleep(0.01)  # "the step": the worker reads meanwhile
    assert wanted <= readers.keys()
    assert {readers[key] for key in wanted} == {"tune-read-ahead-0"}
    hits = caches[name].stats.hits
    ahead.load(caches[name], caches[name].key(batch[0], ""))
    assert caches[name].stats.hits == hits + 1  # counted once, when used
    for _ in range(10):
        ahead.next_batch()
        assert ahead.sampler.state_dict()["step"] - ahead.state_dict()["step"] == 2
    ahead.close()


def test_a_failed_read_raises_its_own_error_when_that_entry_is_used(tmp_path):
    caches, buckets = make_data(tmp_path)
    reference = make_sampler(buckets)
    batches = [reference.next_batch() for _ in range(8)]
    # The first batch (after two) holding an item no earlier batch holds: its entry gets damaged.
    at, item = next(
        (i, item)
        for i in range(2, len(batches))
        for item in batches[i][1]
        if all(item not in earlier for _, earlier in batches[:i])
    )
    victim_name = batches[at][0]
    victim = caches[victim_name].key(item, "")
    path = caches[victim_name].path(victim)
    path.write_bytes(path.read_bytes()[:40])  # truncated entry
    with pytest.raises(Exception) as direct:
        caches[victim_name].load(victim)

    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=2)
    for _ in range(at):  # the batches before it read fine, though the bad one was already read
        name, batch = ahead.next_batch()
        for other in batch:
            ahead.load(caches[name], caches[name].key(other, ""))
    name, batch = ahead.next_batch()
    assert (name, batch) == batches[at]
    with pytest.raises(type(direct.value)) as raised:
        ahead.load(caches[name], victim)
    assert str(raised.value) == str(direct.value)
    ahead.close()


def test_an_entry_missing_when_read_ahead_is_read_when_used(tmp_path):
    # Encoding on demand: the worker finds nothing, the trainer writes the entry, then loads it.
    caches, buckets = make_data(tmp_path)
    reference = make_sampler(buckets)
    name, batch = reference.next_batch()
    key = caches[name].key(batch[0], "")
    caches[name].delete(key)
    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=1)
    assert ahead.next_batch() == (name, batch)
    time.sleep(0.1)
    caches[name].save(key, {"latents": torch.ones(2)})
    assert torch.equal(ahead.load(caches[name], key)["latents"], torch.ones(2))
    ahead.close()


def test_depth_and_workers_are_checked():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ReadAheadSampler(object(), lambda drawn: [], depth=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ReadAheadSampler(object(), lambda drawn: [], workers=0)


def test_an_entry_read_ahead_serves_one_load_and_a_rewritten_entry_is_read_again(tmp_path):
    # A caller that rewrites an entry of the current batch and loads it again gets the new tensors,
    # as without read-ahead (the masked-loss tests do exactly that).
    caches, buckets = make_data(tmp_path)
    ahead = ReadAheadSampler(make_sampler(buckets), reads_of(caches), depth=1)
    name, batch = ahead.next_batch()
    cache, key = caches[name], caches[name].key(batch[0], "")
    first = ahead.load(cache, key)["latents"]
    cache.save(key, {"latents": first + 1})
    assert torch.equal(ahead.load(cache, key)["latents"], first + 1)
    ahead.close()
