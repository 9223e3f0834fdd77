"""The ``aws`` provider when things go wrong: a store that restarts mid-run, refused credentials.

These tests start their own moto server (the session one stays untouched): one is stopped and
started again on the same port while images are read and latents cached. moto's in-process
backends keep buckets and objects while the HTTP server is down, like a real store whose disk
survives a restart; what the run sees is the outage itself: refused connections.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moto.core.authorization import enable_iam_authentication  # noqa: E402

from tune_data import cli  # noqa: E402
from tune_data.cache import TensorCache, cache_root_for  # noqa: E402
from tune_data.config import DatasetConfig, DatasetConfigError  # noqa: E402
from tune_data.discovery import discover  # noqa: E402
from tune_data.s3 import S3AccessError, S3UnreachableError, s3_storage_options  # noqa: E402
from tune_data.storage import open_storage  # noqa: E402
from tune_data.testing import make_shapes_dataset  # noqa: E402

KEY_ID = "AKIAFAILTESTKEY00001"
SECRET = "failure-test-secret-0a1b2c3d4e"
BUCKET = "tune-failure-tests"


class RestartableServer:
    """A moto S3 server on a fixed loopback port that can be stopped and started again."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server = None

    def restart_later(self, delay: float) -> threading.Thread:
        def restart() -> None:
            time.sleep(delay)
            self.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread


@pytest.fixture(scope="module")
def server():
    import boto3

    running = RestartableServer()
    running.start()
    boto3.client(
        "s3", endpoint_url=running.endpoint, region_name="us-east-1",
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
    ).create_bucket(Bucket=BUCKET)
    yield running
    if running.server is not None:
        running.stop()


def dataset_on(server, prefix, **overrides) -> DatasetConfig:
    values = dict(
        id="shapes-s3", type="aws", aws_bucket_name=BUCKET, aws_data_prefix=prefix,
        aws_endpoint_url=server.endpoint, aws_region_name="us-east-1",
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
        caption_strategy="textfile", resolution=64, aspect_bucket_alignment=16,
    )
    values.update(overrides)
    return DatasetConfig.from_dict(values)


def upload(storage, local) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.fs.pipe_file(f"{storage.root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_retry_settings_come_from_the_dataset_then_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    plain = DatasetConfig(id="x", type="aws", aws_bucket_name="b")
    assert s3_storage_options(plain)["config_kwargs"]["retries"] == {"max_attempts": 10, "mode": "standard"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    assert s3_storage_options(plain)["config_kwargs"]["retries"]["max_attempts"] == 4
    mine = DatasetConfig(id="x", type="aws", aws_bucket_name="b", aws_max_attempts=7, aws_max_pool_connections=3)
    assert s3_storage_options(mine)["config_kwargs"] == {
        "retries": {"max_attempts": 7, "mode": "standard"},
        "max_pool_connections": 3,
    }
    with pytest.raises(DatasetConfigError, match="aws_max_attempts"):
        DatasetConfig.from_dict({"id": "x", "type": "aws", "aws_bucket_name": "b", "aws_max_attempts": 0})


def test_a_store_restarting_mid_cache_is_retried_and_the_run_resumes(tmp_path, server, caplog):
    local = make_shapes_dataset(tmp_path / "shapes", count=6, size=(32, 32))
    dataset = dataset_on(server, "restart")
    storage = open_storage(dataset)
    upload(storage, local)
    report = discover(dataset, storage)
    assert len(report.kept) == 6
    cache = TensorCache(
        f"s3://{BUCKET}/cache", "latents", {"model": "test"}, storage_options=s3_storage_options(dataset)
    )

    def cache_all() -> list[str]:
        written = []
        for index, record in enumerate(report.kept):
            if index == 3 and server.server is not None:
                server.stop()  # the store goes away half-way through the pass ...
                restarter = server.restart_later(1.0)  # ... and is back a second later
            key = cache.key(record.path, record.identity)
            if not cache.has(key):
                pixels = torch.tensor(list(storage.read_bytes(record.path)[:16]), dtype=torch.float32)
                cache.save(key, {"latents": pixels})
                written.append(record.path)
        restarter.join()
        return written

    caplog.set_level(logging.WARNING, logger="tune_data.s3")
    started = time.monotonic()
    assert len(cache_all()) == 6
    assert time.monotonic() - started < 30
    messages = [record.getMessage() for record in caplog.records if record.name == "tune_data.s3"]
    assert any("failed" in m and "retrying with backoff" in m and "aws_max_attempts" in m for m in messages)
    assert any("reachable again" in m and "resuming" in m for m in messages)
    assert all(SECRET not in m and KEY_ID not in m for m in messages)
    assert storage.fs.tune_retry_monitor.failures + cache.fs.tune_retry_monitor.failures >= 1

    # Resume: a second pass (a fresh process would do the same) finds every entry and writes none.
    again = TensorCache(
        f"s3://{BUCKET}/cache", "latents", {"model": "test"}, storage_options=s3_storage_options(dataset)
    )
    for record in report.kept:
        assert again.load(again.key(record.path, record.identity))["latents"].shape == (16,)


def test_a_store_down_past_every_attempt_gives_a_clear_error(tmp_path, server):
    dataset = dataset_on(server, "down", aws_max_attempts=2)
    storage = open_storage(dataset)
    storage.fs.pipe_file(f"{storage.root}/a.png", b"x")
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(S3UnreachableError) as info:
            storage.read_bytes("a.png")
        assert time.monotonic() - started < 15
    finally:
        server.start()
    message = str(info.value)
    assert "dataset 'shapes-s3'" in message and f"bucket {BUCKET!r}" in message
    assert "after 2 attempts" in message and "aws_max_attempts" in message
    assert SECRET not in message and KEY_ID not in message


def test_wrong_credentials_give_one_clear_error_without_the_secret(tmp_path, server, capsys):
    wrong_secret = "wrong-secret-that-must-not-leak-77"
    dataset = dataset_on(server, "", aws_access_key_id="AKIANOTAREALKEY00009", aws_secret_access_key=wrong_secret)
    with enable_iam_authentication():  # moto checks keys only when asked to
        with pytest.raises(S3AccessError) as info:
            discover(dataset, open_storage(dataset))
        error = info.value
        assert isinstance(error, DatasetConfigError) and isinstance(error, PermissionError)
        message = str(error)
        assert message.startswith("dataset 'shapes-s3': the S3 store refused access to bucket")
        assert BUCKET in message and "InvalidAccessKeyId" in message
        assert "aws_access_key_id" in message and "aws_secret_access_key" in message
        assert wrong_secret not in message and "AKIANOTAREALKEY00009" not in message
        assert error.__cause__ is None and error.__suppress_context__  # no botocore chain printed

        # The CLI prints that one line: no traceback, no secret.
        config = tmp_path / "multidatabackend.json"
        config.write_text(json.dumps([{
            "id": "shapes-s3", "type": "aws", "aws_bucket_name": BUCKET, "aws_endpoint_url": server.endpoint,
            "aws_region_name": "us-east-1", "aws_access_key_id": "AKIANOTAREALKEY00009",
            "aws_secret_access_key": wrong_secret, "caption_strategy": "filename",
        }]))
        assert cli.main(["inspect", str(config)]) == 1
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "refused access" in printed and "Traceback" not in printed
    assert wrong_secret not in printed


def test_a_cache_on_s3_with_wrong_credentials_gives_one_clear_error_without_the_secret(tmp_path, server, capsys, monkeypatch):
    wrong_key, wrong_secret = "AKIANOTAREALKEY00010", "wrong-cache-secret-must-not-leak-31"
    dataset = dataset_on(server, "", aws_access_key_id=wrong_key, aws_secret_access_key=wrong_secret)
    root, options = cache_root_for(dataset, "cache/vae")  # a prefix in the dataset's own bucket
    cache = TensorCache(root, "latents", {"model": "test"}, storage_options=options, dataset=dataset.id)

    def check(error):
        message = str(error)
        assert isinstance(error, S3AccessError) and isinstance(error, PermissionError)
        assert message.startswith(f"dataset 'shapes-s3' cache s3://{BUCKET}/cache/vae: the S3 store refused access")
        assert f"bucket {BUCKET!r} at {server.endpoint}" in message
        assert "aws_secret_access_key" in message
        assert wrong_secret not in message and wrong_key not in message
        assert error.__cause__ is None and error.__suppress_context__

    with enable_iam_authentication():
        key = cache.key("a.png", "1-etag")
        # Looking an entry up is refused too, not answered "absent" (which would re-encode every
        # image only to fail at the first write).
        for attempt in (lambda: cache.has(key), lambda: cache.load(key), cache.entries, lambda: cache.delete(key)):
            with pytest.raises(S3AccessError) as info:
                attempt()
            check(info.value)
        # The background writer hands the same error back, not wrapped in a CacheWriteError.
        with pytest.raises(S3AccessError) as info:
            with cache.writer() as writer:
                writer.put(key, {"latents": torch.ones(4)})
        check(info.value)

        # tune-data inspect: a local dataset whose cache_dir_vae is on S3 with the environment's
        # (wrong) credentials reports the cache error and exits 1, printing no secret.
        images = make_shapes_dataset(tmp_path / "images", count=2, size=(64, 64))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        config = tmp_path / "multidatabackend.json"
        config.write_text(json.dumps([{
            "id": "local-shapes", "instance_data_dir": str(images), "caption_strategy": "textfile",
            "resolution": 64, "aspect_bucket_alignment": 16, "cache_dir_vae": f"s3://{BUCKET}/vae-cache",
        }]))
        assert cli.main(["inspect", str(config)]) == 1
    out = capsys.readouterr()
    printed = out.out + out.err
    assert f"latent cache: ERROR dataset 'local-shapes' cache s3://{BUCKET}/vae-cache" in printed
    assert "refused access" in printed and "Traceback" not in printed
    assert "2 files seen, 2 kept, 0 dropped" in printed  # the rest of the report is there
    assert wrong_secret not in printed and wrong_key not in printed
