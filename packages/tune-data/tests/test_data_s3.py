"""The ``aws`` provider against a real local S3 server (moto, over HTTP on loopback)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tune_data.buckets import load_training_image, plan_buckets  # noqa: E402
from tune_data.config import DatasetConfig, DatasetConfigError  # noqa: E402
from tune_data.discovery import discover  # noqa: E402
from tune_data.s3 import S3Storage, s3_storage_options  # noqa: E402
from tune_data.storage import open_storage  # noqa: E402
from tune_data.testing import StorageProviderTests, make_shapes_dataset  # noqa: E402

# The same values as conftest's (the server accepts any; these just must not leak).
S3_KEY_ID = "AKIATESTKEYID0000001"
S3_SECRET = "tune-test-secret-9f8e7d6c5b4a"


def aws_dataset(endpoint, bucket, prefix="", **overrides):
    values = dict(
        id="shapes-s3",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix=prefix,
        aws_endpoint_url=endpoint,
        aws_region_name="us-east-1",
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        caption_strategy="textfile",
        resolution=64,
        aspect_bucket_alignment=16,
    )
    values.update(overrides)
    return DatasetConfig.from_dict(values)


def upload(fs, local: Path, target: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{target}/{path.relative_to(local).as_posix()}", path.read_bytes())


class TestS3StorageConformance(StorageProviderTests):
    @pytest.fixture(autouse=True)
    def _server(self, s3_endpoint, s3_bucket):
        self.endpoint = s3_endpoint
        self.fs, self.bucket = s3_bucket

    def make_storage(self, tmp_path, files):
        for rel, data in files.items():
            self.fs.pipe_file(f"{self.bucket}/data/{rel}", data)
        return open_storage(aws_dataset(self.endpoint, self.bucket, "data"))


def test_discover_plan_and_load_images_from_s3(tmp_path, s3_endpoint, s3_bucket):
    fs, bucket = s3_bucket
    local = make_shapes_dataset(tmp_path / "shapes", count=6, size=(64, 48), varied_sizes=True)
    upload(fs, local, f"{bucket}/sets/shapes")
    fs.pipe_file(f"{bucket}/sets/other/ignored.png", b"outside the prefix")
    dataset = aws_dataset(s3_endpoint, bucket, "/sets/shapes/")
    storage = open_storage(dataset)
    assert isinstance(storage, S3Storage)
    assert storage.url == f"s3://{bucket}/sets/shapes"

    report = discover(dataset, storage, metadata_dir=tmp_path / "meta")
    assert report.seen == 6 and len(report.kept) == 6 and not report.dropped
    assert report.kept[0].caption == (local / "0000.txt").read_text().strip()
    # The identity is the object's size and ETag (an md5 for single-part uploads).
    etag = fs.info(f"{bucket}/sets/shapes/0000.png")["ETag"].strip('"')
    assert report.kept[0].identity.endswith(etag)

    buckets = plan_buckets(report.kept, dataset, seed=0)
    assert sum(len(items) for items in buckets.values()) == 6
    for (width, height), items in buckets.items():
        pixels = load_training_image(storage, items[0])
        assert pixels.shape == (height, width, 3)

    # A second discovery reuses the metadata cache; a re-uploaded image is measured again.
    fs.pipe_file(f"{bucket}/sets/shapes/0000.png", (local / "0001.png").read_bytes())
    again = discover(dataset, storage, metadata_dir=tmp_path / "meta")
    assert again.kept[0].identity != report.kept[0].identity
    assert (again.kept[0].width, again.kept[0].height) == (96, 48)


def test_credentials_never_show_in_repr_logs_or_errors(tmp_path, s3_endpoint, s3_bucket, caplog):
    fs, bucket = s3_bucket
    make_shapes_dataset(tmp_path / "shapes", count=2)
    upload(fs, tmp_path / "shapes", bucket)
    dataset = aws_dataset(s3_endpoint, bucket)
    storage = open_storage(dataset)
    caplog.set_level(logging.DEBUG)
    discover(dataset, storage)
    # botocore's own DEBUG wire log carries the key id in the signed Authorization header (as with
    # every AWS client); the secret never leaves the process, and INFO and above hold neither.
    assert S3_SECRET not in caplog.text
    texts = [repr(dataset), repr(storage), str(storage.describe())]
    texts += [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    with pytest.raises(FileNotFoundError) as missing:
        storage.read_bytes("nope.png")
    texts.append(str(missing.value))
    wrong_bucket = open_storage(aws_dataset(s3_endpoint, bucket + "-missing"))
    with pytest.raises(Exception) as no_bucket:
        wrong_bucket.list_files(None)
    texts.append(str(no_bucket.value))
    assert "does not exist" in texts[-1] or "NoSuchBucket" in texts[-1] or texts[-1]
    for text in texts:
        assert S3_SECRET not in text
        assert S3_KEY_ID not in text


def test_a_secret_inside_an_error_message_is_scrubbed(s3_endpoint, s3_bucket, monkeypatch):
    _, bucket = s3_bucket
    storage = open_storage(aws_dataset(s3_endpoint, bucket))

    def leaky(path):
        raise PermissionError(f"denied for {S3_KEY_ID}:{S3_SECRET} at {path}")

    monkeypatch.setattr(storage.fs, "cat_file", leaky)
    with pytest.raises(PermissionError) as info:
        storage.read_bytes("a.png")
    assert S3_SECRET not in str(info.value) and S3_KEY_ID not in str(info.value)
    assert "denied for ***:***" in str(info.value)


def test_credentials_and_endpoint_fall_back_to_the_environment(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    fs, bucket = s3_bucket
    make_shapes_dataset(tmp_path / "shapes", count=2)
    upload(fs, tmp_path / "shapes", bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dataset = DatasetConfig.from_dict(
        {"id": "env", "type": "aws", "aws_bucket_name": bucket, "caption_strategy": "textfile"}
    )
    options = s3_storage_options(dataset)
    assert options["key"] == S3_KEY_ID and options["endpoint_url"] == s3_endpoint
    assert options["client_kwargs"] == {"region_name": "us-east-1"}
    storage = open_storage(dataset)
    assert storage.describe()["credentials"] == "from environment"
    assert len(discover(dataset, storage).kept) == 2


def test_config_values_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    dataset = DatasetConfig(
        id="x", type="aws", aws_bucket_name="b", aws_access_key_id="cfg", aws_secret_access_key="cfg-secret"
    )
    assert s3_storage_options(dataset)["secret"] == "cfg-secret"


@pytest.mark.parametrize(
    ("bucket", "message"),
    [
        (None, "dataset 'x': aws_bucket_name is required for type 'aws'"),
        ("bucket/with/folder", "aws_bucket_name must be a bare bucket name"),
    ],
)
def test_bucket_name_errors(bucket, message):
    with pytest.raises(DatasetConfigError, match=message):
        S3Storage(DatasetConfig(id="x", type="aws", aws_bucket_name=bucket))


def test_s3_discovery_needs_no_head_requests_and_a_rerun_reads_no_object(tmp_path, s3_endpoint, s3_bucket):
    fs, bucket = s3_bucket
    local = make_shapes_dataset(tmp_path / "shapes", count=5, size=(64, 48))
    upload(fs, local, f"{bucket}/cold")
    dataset = aws_dataset(s3_endpoint, bucket, "cold")
    storage = open_storage(dataset)

    def no_head(*args, **kwargs):
        raise AssertionError("a HEAD request: sizes and ETags come from the listing")

    storage.fs.info = storage.fs._info = no_head
    report = discover(dataset, storage, metadata_dir=tmp_path / "meta")
    assert len(report.kept) == 5 and report.kept[0].caption == "a red circle on a white background"

    again = open_storage(dataset)

    def no_read(*args, **kwargs):
        raise AssertionError("a warm discovery reads no object: sizes and captions are cached")

    again.fs.open = again.fs.cat_file = again.fs._cat_file = no_read
    rerun = discover(dataset, again, metadata_dir=tmp_path / "meta")
    assert [(r.path, r.caption, r.width) for r in rerun.kept] == [(r.path, r.caption, r.width) for r in report.kept]


def test_an_object_deleted_after_listing_reads_as_missing(tmp_path, s3_endpoint, s3_bucket):
    fs, bucket = s3_bucket
    fs.pipe_file(f"{bucket}/gone/a.txt", b"caption")
    fs.pipe_file(f"{bucket}/gone/a.png", b"png")
    storage = open_storage(aws_dataset(s3_endpoint, bucket, "gone"))
    assert storage.list_files(None) == ["a.png", "a.txt"]
    fs.rm_file(f"{bucket}/gone/a.txt")
    fs.rm_file(f"{bucket}/gone/a.png")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a.txt")
    with pytest.raises(FileNotFoundError):
        with storage.open("a.png") as handle:
            handle.read()
