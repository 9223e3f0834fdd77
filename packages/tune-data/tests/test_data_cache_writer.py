"""The background cache writer: bounded queue, atomic entries, errors surfaced, readable by others."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tune_data.cache import CacheWriteError, CacheWriter, TensorCache  # noqa: E402

SETTINGS = {"model": "tiny", "resolution": 64}


def make_cache(root) -> TensorCache:
    return TensorCache(root, "latents", SETTINGS)


def test_entries_written_in_the_background_are_read_by_another_instance(tmp_path):
    writer_side, reader_side = make_cache(tmp_path), make_cache(tmp_path)  # two "ranks", one folder
    keys = [writer_side.key(f"img{i}.png", f"{i}-etag") for i in range(12)]
    seen_complete: list[str] = []
    stop = threading.Event()

    def read_while_writing() -> None:
        # Whatever the other rank sees as present must load whole (no half-written entry).
        while not stop.is_set():
            for key in keys:
                if key not in seen_complete and reader_side.has(key):
                    assert reader_side.load(key)["latents"].shape == (4, 8, 8)
                    seen_complete.append(key)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    source = torch.randn(len(keys), 4, 8, 8)
    with writer_side.writer(max_pending=3) as writer:
        for index, key in enumerate(keys):
            batch = source[index].clone()
            writer.put(key, {"latents": batch}, {"item": f"img{index}.png"})
            batch.zero_()  # the caller reuses its buffer at once: the writer took a copy
    stop.set()
    reader.join()

    assert writer_side.stats.writes == len(keys)
    fresh = make_cache(tmp_path)
    for index, key in enumerate(keys):
        assert torch.equal(fresh.load(key)["latents"], source[index])
        assert fresh.metadata(key) == {"item": f"img{index}.png"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_queue_bound_holds_the_producer_back(tmp_path, monkeypatch):
    cache = make_cache(tmp_path)
    release = threading.Event()
    real_save = cache.save

    def slow_save(*args, **kwargs):
        release.wait(10)  # a stalled disk or object store
        return real_save(*args, **kwargs)

    monkeypatch.setattr(cache, "save", slow_save)
    writer = CacheWriter(cache, max_pending=2)
    queued: list[int] = []

    def produce() -> None:
        for index in range(6):
            writer.put(f"k{index:02d}", {"latents": torch.full((2,), float(index))})
            queued.append(index)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 10
    while len(queued) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough for a fourth put, were the queue unbounded
    # One entry is being written (stalled), two wait in the queue; the fourth put blocks.
    assert queued == [0, 1, 2]
    assert producer.is_alive()
    assert writer.pending == 3
    release.set()
    producer.join(10)
    writer.close()
    assert queued == list(range(6))
    assert [key for key, _ in make_cache(tmp_path).entries()] == [f"k{index:02d}" for index in range(6)]


def test_a_write_error_is_raised_by_the_next_call(tmp_path, monkeypatch):
    cache = make_cache(tmp_path)
    real_save = cache.save

    def failing_save(key, tensors, metadata=None):
        if key == "bad":
            raise OSError(28, "No space left on device")
        return real_save(key, tensors, metadata)

    monkeypatch.setattr(cache, "save", failing_save)
    writer = cache.writer(max_pending=4)
    writer.put("good", {"latents": torch.ones(2)})
    writer.put("bad", {"latents": torch.ones(2)})
    with pytest.raises(CacheWriteError, match="writing cache entry bad .* No space left on device") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    writer.flush()  # reported once; the writer goes on
    writer.put("after", {"latents": torch.ones(2)})
    writer.close()
    writer.close()
    assert [key for key, _ in cache.entries()] == ["after", "good"]
    with pytest.raises(RuntimeError, match="after close"):
        writer.put("late", {"latents": torch.ones(2)})

    # Raised by put too, and a `with` block surfaces it on exit.
    with pytest.raises(CacheWriteError):
        with cache.writer() as again:
            again.put("bad", {"latents": torch.ones(2)})
            again.flush()
    with pytest.raises(CacheWriteError):
        with cache.writer() as again:
            again.put("bad", {"latents": torch.ones(2)})
            time.sleep(0.3)
            again.put("good2", {"latents": torch.ones(2)})


def test_a_process_killed_mid_write_leaves_no_partial_entry(tmp_path):
    # A real crash: the child process dies (os._exit, no cleanup) in the middle of writing its
    # second entry, after half of the bytes reached the disk.
    script = textwrap.dedent(
        f"""
        import os, safetensors.torch as st, torch
        from tune_data.cache import TensorCache
        real = st.save_file
        calls = []
        def crashing(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                data = st.save(tensors, metadata=metadata)
                with open(path, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                os._exit(3)
            real(tensors, path, metadata=metadata)
        st.save_file = crashing
        cache = TensorCache({str(tmp_path)!r}, "latents", {SETTINGS!r})
        with cache.writer(max_pending=2) as writer:
            for name in ("first", "second", "third"):
                writer.put(name, {{"latents": torch.ones(64, 64)}})
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr

    cache = make_cache(tmp_path)
    assert cache.has("first") and torch.equal(cache.load("first")["latents"], torch.ones(64, 64))
    assert not cache.has("second") and not cache.has("third")
    assert [key for key, _ in cache.entries()] == ["first"]
    leftovers = list(tmp_path.rglob("*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith("second.safetensors.")

    # The rerun writes what is missing; the leftover never counts as an entry.
    with cache.writer() as writer:
        for name in ("second", "third"):
            if not cache.has(name):
                writer.put(name, {"latents": torch.zeros(2)})
    assert [key for key, _ in make_cache(tmp_path).entries()] == ["first", "second", "third"]
