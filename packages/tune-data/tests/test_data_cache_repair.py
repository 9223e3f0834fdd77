"""TensorCache's repair tools: check an entry, delete it, list what is stored."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tune_data.cache import TensorCache  # noqa: E402


@pytest.mark.parametrize("compress", [False, True])
def test_check_names_a_truncated_entry_and_delete_removes_it(tmp_path, compress):
    cache = TensorCache(tmp_path, "latents", {"r": 64}, compress_disk_cache=compress)
    good, bad = cache.key("a.png", "1"), cache.key("b.png", "1")
    for key in (good, bad):
        cache.save(key, {"latents": torch.randn(4, 8, 8)})
    path = cache.path(bad)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    assert cache.check(good) is None
    problem = cache.check(bad)
    assert problem is not None and problem != "missing"
    assert cache.check(cache.key("c.png", "1")) == "missing"
    assert cache.stats.hits == 0  # checks are not uses

    assert sorted(key for key, _ in cache.entries()) == sorted([good, bad])
    assert cache.delete(bad) is True and cache.delete(bad) is False
    assert [key for key, _ in cache.entries()] == [good]
    assert dict(cache.entries())[good] == cache.path(good).stat().st_size
