"""Video datasets: discovery of mp4/webm, frame limits, bucketing by frame size, sampled clips."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

import numpy as np  # noqa: E402

from tune_data.buckets import plan_buckets  # noqa: E402
from tune_data.cli import main  # noqa: E402
from tune_data.config import DatasetConfig, DatasetConfigError, load_dataset_configs  # noqa: E402
from tune_data.discovery import TOO_LONG, TOO_SHORT, UNDECODABLE, UNSUPPORTED_EXTENSION, VideoRecord, discover  # noqa: E402
from tune_data.storage import LocalStorage  # noqa: E402
from tune_data.testing import make_video  # noqa: E402
from tune_data.video import frame_indices, load_training_clip  # noqa: E402


def levels(clip):
    """Which source frame each clip frame is (make_video's grey level // 16)."""
    return [int(round(float(frame.mean()) / 16)) for frame in clip]


def video_dataset(root, **video):
    return DatasetConfig.from_dict({
        "id": "clips", "dataset_type": "video", "instance_data_dir": str(root),
        "caption_strategy": "textfile", "resolution": 64, "aspect_bucket_alignment": 16,
        "video": {"num_frames": 4, **video},
    })


@pytest.fixture
def clips(tmp_path):
    root = tmp_path / "clips"
    make_video(root / "wide.mp4", frames=12, size=(96, 64), fps=8)
    make_video(root / "tall.webm", frames=12, size=(48, 64), fps=8)
    make_video(root / "short.mp4", frames=3, size=(64, 64), fps=8)
    make_video(root / "square.mp4", frames=10, size=(64, 64), fps=8)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (root / "still.png").write_bytes(b"an image in a video dataset")
    for name in ("wide", "tall", "short", "square", "broken", "still"):
        (root / f"{name}.txt").write_text(f"a {name} clip\n")
    return root


def test_discovery_keeps_playable_videos_and_drops_the_rest_with_reasons(clips):
    dataset = video_dataset(clips, max_frames=11)
    with pytest.warns(UserWarning, match="skipping undecodable video broken.mp4"):
        report = discover(dataset, LocalStorage(dataset))
    kept = {record.path: record for record in report.kept}
    assert set(kept) == {"square.mp4"}  # wide and tall are 12 frames: longer than max_frames 11
    reasons = {drop.path: drop.reason for drop in report.dropped}
    assert reasons == {"broken.mp4": UNDECODABLE, "still.png": UNSUPPORTED_EXTENSION,
                       "short.mp4": TOO_SHORT, "wide.mp4": TOO_LONG, "tall.webm": TOO_LONG}
    assert "3 frames < min_frames 4" in next(d.detail for d in report.dropped if d.path == "short.mp4")
    record = kept["square.mp4"]
    assert isinstance(record, VideoRecord)
    assert (record.width, record.height, record.frames, record.fps) == (64, 64, 10, 8.0)
    assert record.caption == "a square clip"


def test_videos_bucket_by_frame_size_and_clips_are_sampled_at_the_dataset_fps(clips, tmp_path):
    dataset = video_dataset(clips, fps=4)  # every second frame of an 8 fps video
    with pytest.warns(UserWarning):
        report = discover(dataset, LocalStorage(dataset), metadata_dir=tmp_path / "meta")
    assert sorted(r.path for r in report.kept) == ["square.mp4", "tall.webm", "wide.mp4"]
    buckets = plan_buckets(report.kept, dataset)
    assert sorted(buckets) == [(48, 80), (64, 64), (80, 48)]  # 64x64 area at each video's aspect

    storage = LocalStorage(dataset)
    for (width, height), items in buckets.items():
        clip = load_training_clip(storage, items[0], num_frames=4, fps=dataset.video_fps)
        assert clip.shape == (4, height, width, 3) and clip.dtype == np.uint8
        assert levels(clip) == [0, 2, 4, 6]

    # A rerun takes sizes and frame counts from the metadata cache (no video is opened).
    with pytest.warns(UserWarning, match="broken.mp4"):  # remembered as undecodable
        again = discover(dataset, storage, metadata_dir=tmp_path / "meta")
    assert {(r.path, r.frames) for r in again.kept} == {(r.path, r.frames) for r in report.kept}


def test_frame_indices_follow_the_rate():
    assert frame_indices(30, 4, None) == [0, 1, 2, 3]
    assert frame_indices(30, 4, 15) == [0, 2, 4, 6]
    assert frame_indices(24, 5, 10) == [0, 2, 4, 7, 9]
    assert frame_indices(8, 4, 16) == [0, 0, 1, 1]  # faster than the source repeats frames


def test_scan_for_errors_counts_frames_by_decoding(clips):
    dataset = DatasetConfig.from_dict({**json.loads(json.dumps({
        "id": "clips", "dataset_type": "video", "instance_data_dir": str(clips), "caption_strategy": "textfile",
        "video": {"num_frames": 4}})), "scan_for_errors": True})
    with pytest.warns(UserWarning):
        report = discover(dataset, LocalStorage(dataset))
    assert {r.path: r.frames for r in report.kept}["tall.webm"] == 12


def test_video_keys_are_validated_and_nested_block_is_read():
    dataset = DatasetConfig.from_dict({"id": "v", "dataset_type": "video", "instance_data_dir": ".",
                                       "video": {"num_frames": 33, "min_frames": 17, "is_i2v": True}})
    assert (dataset.video_num_frames, dataset.min_frames, dataset.video_is_i2v) == (33, 17, True)
    assert dataset.cache_settings()["num_frames"] == 33
    with pytest.raises(DatasetConfigError, match="video.max_frames must be >= min_frames"):
        DatasetConfig.from_dict({"id": "v", "dataset_type": "video", "video": {"num_frames": 8, "max_frames": 4}})
    assert load_dataset_configs([{"id": "v", "dataset_type": "video", "instance_data_dir": "."}])


def test_inspect_reports_video_frames(clips, tmp_path, capsys):
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([{"id": "clips", "dataset_type": "video", "instance_data_dir": str(clips),
                                 "caption_strategy": "textfile", "video": {"num_frames": 4}}]))
    with pytest.warns(UserWarning):
        assert main(["inspect", str(path), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["kept"] == 3 and info["video_frames"] == {"min": 10, "mean": 11.3, "max": 12}
    assert info["dropped"]["too short"] == ["short.mp4"]


def test_missing_pyav_names_the_extra(monkeypatch, clips):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    dataset = video_dataset(clips)
    with pytest.raises(ImportError, match=r'pip install "tune-data\[video\]"'):
        discover(dataset, LocalStorage(dataset))
