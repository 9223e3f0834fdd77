"""What makes a rerun of discovery cheap: cached captions, no request per file, parallel remote reads."""

from __future__ import annotations

import os
import threading

import pytest

from tune_data.config import DatasetConfig
from tune_data.discovery import MISSING_CAPTION, discover
from tune_data.storage import FsspecStorage, LocalStorage
from tune_data.testing import make_shapes_dataset


class CountingStorage(LocalStorage):
    """A local folder that counts caption reads and image opens."""

    def __init__(self, dataset):
        super().__init__(dataset)
        self.reads: list[str] = []
        self.opens: list[str] = []

    def read_bytes(self, rel):
        self.reads.append(rel)
        return super().read_bytes(rel)

    def open(self, rel, mode="rb"):
        self.opens.append(rel)
        return super().open(rel, mode)


def dataset(path, **overrides):
    return DatasetConfig(id="shapes", instance_data_dir=str(path), caption_strategy="textfile", **overrides)


def test_a_rerun_reads_no_caption_file_unless_it_changed(tmp_path):
    make_shapes_dataset(tmp_path / "data", count=5)
    ds = dataset(tmp_path / "data")
    first = CountingStorage(ds)
    report = discover(ds, first, metadata_dir=tmp_path / "meta")
    assert len(first.reads) == 5 and len(first.opens) == 5

    second = CountingStorage(ds)
    again = discover(ds, second, metadata_dir=tmp_path / "meta")
    assert second.reads == [] and second.opens == []
    assert [r.caption for r in again.kept] == [r.caption for r in report.kept]

    caption = tmp_path / "data" / "0002.txt"
    caption.write_text("a brand new caption, longer than before\n")
    os.utime(caption, ns=(1, 1))  # a different mtime even on coarse clocks
    third = CountingStorage(ds)
    changed = discover(ds, third, metadata_dir=tmp_path / "meta")
    assert third.reads == ["0002.txt"]
    assert changed.kept[2].caption == "a brand new caption, longer than before"


def test_a_deleted_caption_file_drops_the_image_even_when_cached(tmp_path):
    make_shapes_dataset(tmp_path / "data", count=3)
    ds = dataset(tmp_path / "data")
    discover(ds, LocalStorage(ds), metadata_dir=tmp_path / "meta")
    (tmp_path / "data" / "0001.txt").unlink()
    with pytest.warns(UserWarning, match="0001.png"):
        report = discover(ds, LocalStorage(ds), metadata_dir=tmp_path / "meta")
    assert [(d.path, d.reason) for d in report.dropped] == [("0001.png", MISSING_CAPTION)]


def test_the_instance_prompt_prefix_applies_to_cached_captions(tmp_path):
    make_shapes_dataset(tmp_path / "data", count=2)
    plain = dataset(tmp_path / "data")
    discover(plain, LocalStorage(plain), metadata_dir=tmp_path / "meta")
    prefixed = dataset(tmp_path / "data", instance_prompt="sks", prepend_instance_prompt=True)
    report = discover(prefixed, LocalStorage(prefixed), metadata_dir=tmp_path / "meta")
    assert report.kept[0].caption == "sks a red circle on a white background"


class RemoteLikeStorage(FsspecStorage):
    """Local files behind a provider that allows concurrent reads, recording which threads read."""

    concurrent_reads = True

    def __init__(self, root):
        import fsspec

        super().__init__(fsspec.filesystem("memory"), "/ignored")
        self.local = fsspec.filesystem("file")
        self.base = str(root)
        self.threads: set[str] = set()

    def list_files(self, extensions=None):
        return sorted(os.path.relpath(p, self.base) for p in self.local.find(self.base))

    def open(self, rel, mode="rb"):
        self.threads.add(threading.current_thread().name)
        return self.local.open(os.path.join(self.base, rel), mode)

    def read_bytes(self, rel):
        return self.local.cat_file(os.path.join(self.base, rel))

    def exists(self, rel):
        return self.local.isfile(os.path.join(self.base, rel))

    def identity(self, rel):
        stat = os.stat(os.path.join(self.base, rel))
        return f"{stat.st_size}-{stat.st_mtime_ns}"


def test_a_provider_allowing_concurrent_reads_is_examined_on_threads_in_listing_order(tmp_path):
    root = make_shapes_dataset(tmp_path / "data", count=24, varied_sizes=True)
    (root / "0005.txt").unlink()
    storage = RemoteLikeStorage(root)
    ds = dataset(root)
    with pytest.warns(UserWarning, match="0005.png"):
        report = discover(ds, storage)
    assert any(name.startswith("tune-discovery") for name in storage.threads)
    assert [r.path for r in report.kept] == [f"{i:04d}.png" for i in range(24) if i != 5]
    assert [d.path for d in report.dropped] == ["0005.png"]
    assert report.kept[1].width == 96  # sizes stay with their files


def test_a_provider_that_does_not_declare_concurrent_reads_is_read_on_one_thread(tmp_path):
    root = make_shapes_dataset(tmp_path / "data", count=4)
    storage = RemoteLikeStorage(root)
    storage.concurrent_reads = False
    discover(dataset(root), storage)
    assert storage.threads == {threading.current_thread().name}
