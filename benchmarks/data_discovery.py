"""Discovery + bucketing speed of tune-data on 10,000 small images, local and on S3.

What a user waits for before the first step: ``tune_data.discovery.discover`` (list the storage,
read each image's header, find each caption, drop what cannot be used) and
``tune_data.buckets.plan_buckets`` (bucket, resize and crop of every image).

Rows:
  local cold       a folder of N images (jpg/png/webp, 12 aspect ratios, 48-160 px) with a
                   ``.txt`` caption beside each; no metadata cache (first run)
  local warm       the same with the metadata cache of the first run (a rerun)
  s3 cold / warm   the same N images and captions as 2N objects in a bucket of a local S3 server
                   (moto's server mode in a subprocess, over HTTP on loopback), ``type: aws``
  s3 trusted       warm, with ``skip_file_discovery: metadata`` (no identity check)
  bucketing        ``plan_buckets`` over the kept records (pure CPU)

The images are tiny on purpose: discovery reads headers only, so the time per file is the cost of
a listing entry, an open, a header parse and a caption read, independent of the image's size.

Run from the repo root (it generates its data in a temporary folder):
  OMP_NUM_THREADS=1 uv run python benchmarks/data_discovery.py            # N = 10,000
  OMP_NUM_THREADS=1 uv run python benchmarks/data_discovery.py -n 1000 --no-s3
Writes benchmarks/results/data_discovery.json (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3), (2, 1), (1, 2), (5, 4), (4, 5), (21, 9)]
FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def make_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` small images in 100 sub-folders, each with a ``.txt`` caption."""
    from PIL import Image

    rng = random.Random(seed)
    palette = [Image.new("RGB", (160, 160), tuple(rng.randrange(256) for _ in range(3))) for _ in range(16)]
    for index in range(count):
        folder = root / f"part{index % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        aw, ah = ASPECTS[index % len(ASPECTS)]
        scale = rng.randint(48, 160) / max(aw, ah)
        size = (max(8, round(aw * scale)), max(8, round(ah * scale)))
        ext, fmt = FORMATS[index % 20 == 0 and 1 or (2 if index % 20 == 1 else 0)]
        image = palette[index % len(palette)].resize(size)
        image.save(folder / f"img{index:05d}.{ext}", fmt)
        (folder / f"img{index:05d}.txt").write_text(f"a photo number {index} of a test scene\n")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_discovery(dataset, storage, metadata_dir: Path):
    from tune_data.discovery import discover

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timed(lambda: discover(dataset, storage, metadata_dir=metadata_dir))


def row(name: str, files: int, seconds: float, kept: int, **extra) -> dict:
    return dict(row=name, files=files, seconds=round(seconds, 3), files_per_s=round(files / seconds, 1), kept=kept, **extra)


def bench_local(data: Path, work: Path, count: int) -> list[dict]:
    from tune_data.buckets import plan_buckets
    from tune_data.config import DatasetConfig
    from tune_data.storage import open_storage

    dataset = DatasetConfig(id="bench", instance_data_dir=str(data), caption_strategy="textfile", resolution=512)
    metadata = work / "meta-local"
    rows = []
    report, seconds = run_discovery(dataset, open_storage(dataset), metadata)
    rows.append(row("local cold", report.seen, seconds, len(report.kept)))
    report, seconds = run_discovery(dataset, open_storage(dataset), metadata)
    rows.append(row("local warm", report.seen, seconds, len(report.kept)))
    buckets, seconds = timed(lambda: plan_buckets(list(report.kept), dataset, seed=0))
    rows.append(row("bucketing", len(report.kept), seconds, len(report.kept), buckets=len(buckets)))
    return rows


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process, so its request handling does not share this
    process's GIL with the code under test (as a real store would not)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        raise RuntimeError("moto server did not start")
    return server, f"http://127.0.0.1:{port}"


def bench_s3(data: Path, work: Path, count: int) -> list[dict]:
    import boto3
    import s3fs

    from tune_data.config import DatasetConfig
    from tune_data.storage import open_storage

    key, secret = "AKIABENCH0000000001", "bench-secret"
    server, endpoint = start_moto()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=key, aws_secret_access_key=secret,
        ).create_bucket(Bucket=bucket)
        fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"})
        _, upload_s = timed(lambda: fs.put(str(data) + "/", f"{bucket}/photos/", recursive=True))
        print(f"uploaded {2 * count} objects in {upload_s:.1f} s", file=sys.stderr, flush=True)

        def dataset(**extra):
            return DatasetConfig(
                id="bench-s3", type="aws", aws_bucket_name=bucket, aws_data_prefix="photos/",
                aws_endpoint_url=endpoint, aws_region_name="us-east-1", aws_access_key_id=key,
                aws_secret_access_key=secret, caption_strategy="textfile", resolution=512, **extra,
            )

        metadata = work / "meta-s3"
        rows = []
        storage = open_storage(dataset())
        listed, seconds = timed(lambda: storage.list_files(None))
        rows.append(row("s3 listing only", len(listed), seconds, 0))
        report, seconds = run_discovery(dataset(), open_storage(dataset()), metadata)
        rows.append(row("s3 cold", report.seen, seconds, len(report.kept)))
        report, seconds = run_discovery(dataset(), open_storage(dataset()), metadata)
        rows.append(row("s3 warm", report.seen, seconds, len(report.kept)))
        trusted = dataset(skip_file_discovery="metadata")
        report, seconds = run_discovery(trusted, open_storage(trusted), metadata)
        rows.append(row("s3 warm, skip_file_discovery: metadata", report.seen, seconds, len(report.kept)))
        return rows
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=10_000, help="images (default 10,000)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    parser.add_argument("--json", default="benchmarks/results/data_discovery.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        work = Path(tmp)
        data = work / "images"
        _, gen_s = timed(lambda: make_images(data, args.count))
        print(f"generated {args.count} images + captions in {gen_s:.1f} s", file=sys.stderr, flush=True)
        rows = bench_local(data, work, args.count)
        if not args.no_s3:
            rows += bench_s3(data, work, args.count)

    print(f"\n{'row':<40} {'files':>7} {'seconds':>8} {'files/s':>9} {'kept':>6}")
    for r in rows:
        print(f"{r['row']:<40} {r['files']:>7} {r['seconds']:>8.2f} {r['files_per_s']:>9.0f} {r['kept']:>6}")
    result = dict(
        benchmark="data_discovery",
        count=args.count,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
        rows=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
