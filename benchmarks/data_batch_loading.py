"""Cached-latent batch loading: how many training batches per second the caches can feed.

A training step only reads cached tensors (``tune_train.data.TrainingData.load_batch``): one
latent entry per sample, stacked, plus one prompt-embedding entry per sample. This times that
read path on entries written by ``tune_data.cache.TensorCache`` exactly as training writes them.

Rows (latents 16 x 128 x 128, i.e. a 1024 px image for a 16-channel VAE; batch 4 by default):
  latents fp32                 TensorCache.load + torch.stack, plain safetensors (memory-mapped)
  latents bf16                 the same with bfloat16 latents (half the bytes)
  latents fp32, gzip           entries written with compress_disk_cache=True
  load_batch fp32 + text       TrainingData.load_batch: latents and a 512 x 2560 bf16 text
                               embedding per sample (Qwen3-4B-sized, Z-Image's encoder)
  latents fp32, gzip, read-ahead
                               the gzip entries through tune_data.prefetch.ReadAheadSampler
                               (depth 4, 2 reader threads), as the trainer reads them
  gzip + N ms step, in place / read-ahead
                               a stand-in training step (N ms of sleep, which like waiting on
                               the accelerator releases the GIL) after each gzip batch: read in
                               place the read adds to every step, read ahead it overlaps the step

Entries are read in a shuffled order over ``--entries`` items, after one untimed pass, so the
files are in the OS page cache (the steady state of an epoch on a machine with enough RAM);
``--cold`` drops that warm-up pass (first read after writing is still page-cached on Linux).

Run from the repo root:
  OMP_NUM_THREADS=1 uv run python benchmarks/data_batch_loading.py
Writes benchmarks/results/data_batch_loading.json (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path


def write_entries(cache, count: int, shape: tuple[int, ...], dtype) -> list[str]:
    import torch

    keys = []
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        key = cache.key(f"img{index:05d}.jpg|1024x1024", f"{index}-0")
        cache.save(key, {"latents": torch.randn(shape, generator=generator).to(dtype)})
        keys.append(key)
    return keys


def time_batches(load_batch, keys: list[str], batch: int, seconds: float, warm: bool) -> dict:
    order = keys[:]
    random.Random(0).shuffle(order)
    batches = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    if warm:
        for chunk in batches:
            load_batch(chunk)
    done = 0
    start = time.perf_counter()
    while True:
        for chunk in batches:
            load_batch(chunk)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return dict(batches=done, seconds=round(elapsed, 3), batches_per_s=round(done / elapsed, 1),
                ms_per_batch=round(1000 * elapsed / done, 3))


class KeySampler:
    """The batches of ``time_batches`` as a sampler (``next_batch``/``state_dict``), for read-ahead."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches, self.position = batches, 0

    def next_batch(self) -> list[str]:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def time_read_ahead(cache, keys: list[str], batch: int, seconds: float, step_s: float, depth: int = 4) -> dict:
    """Batches per second through ReadAheadSampler, each followed by a ``step_s`` stand-in step."""
    import torch
    from tune_data.prefetch import ReadAheadSampler

    order = keys[:]
    random.Random(0).shuffle(order)
    batches = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    sampler = ReadAheadSampler(KeySampler(batches), lambda chunk: [(cache, key) for key in chunk],
                               depth=depth, workers=2)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or done % len(batches):
        chunk = sampler.next_batch()
        torch.stack([sampler.load(cache, key)["latents"] for key in chunk])
        if step_s:
            time.sleep(step_s)
        done += 1
    elapsed = time.perf_counter() - start
    sampler.close()
    return dict(batches=done, seconds=round(elapsed, 3), batches_per_s=round(done / elapsed, 1),
                ms_per_batch=round(1000 * elapsed / done, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=256, help="cached items (default 256)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", default="16x128x128", help="C x H x W of one latent")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    parser.add_argument("--cold", action="store_true", help="no untimed warm-up pass")
    parser.add_argument("--step-ms", type=float, default=100.0,
                        help="stand-in training step of the read-ahead rows (default 100 ms; a 1024 px "
                             "Z-Image LoRA step on an H100 takes 511-722 ms)")
    parser.add_argument("--json", default="benchmarks/results/data_batch_loading.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from tune_data.cache import TensorCache
    from tune_data.config import DatasetConfig

    shape = tuple(int(part) for part in args.latent.split("x"))
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-bench-cache-") as tmp:
        root = Path(tmp)
        variants = [
            ("latents fp32", torch.float32, False),
            ("latents bf16", torch.bfloat16, False),
            ("latents fp32, gzip", torch.float32, True),
        ]
        fp32_cache = gzip_cache = gzip_keys = None
        for name, dtype, compress in variants:
            cache = TensorCache(root / name.replace(" ", "_").replace(",", ""), "latents", {"v": 1},
                                compress_disk_cache=compress)
            keys = write_entries(cache, args.entries, shape, dtype)
            if name == "latents fp32":
                fp32_cache = cache
            if compress:
                gzip_cache, gzip_keys = cache, keys

            def load(chunk, cache=cache):
                return torch.stack([cache.load(key)["latents"] for key in chunk])

            result = time_batches(load, keys, args.batch, args.seconds, not args.cold)
            entry_bytes = os.path.getsize(cache._find(keys[0])[0])
            rows.append(dict(row=name, entry_bytes=entry_bytes, **result))
            print(f"{name}: {result['batches_per_s']} batches/s", flush=True)

        # Compressed entries read ahead: alone, then behind a stand-in step (in place vs ahead).
        gzip_bytes = os.path.getsize(gzip_cache._find(gzip_keys[0])[0])
        result = time_read_ahead(gzip_cache, gzip_keys, args.batch, args.seconds, 0.0)
        rows.append(dict(row="latents fp32, gzip, read-ahead", entry_bytes=gzip_bytes, **result))
        print(f"gzip read-ahead: {result['batches_per_s']} batches/s", flush=True)
        step_s = args.step_ms / 1000

        def load_then_step(chunk, cache=gzip_cache):
            torch.stack([cache.load(key)["latents"] for key in chunk])
            time.sleep(step_s)

        label = f"gzip + {args.step_ms:g} ms step"
        # stall_ms: what the data adds to each step (0 when reading is fully hidden).
        result = time_batches(load_then_step, gzip_keys, args.batch, args.seconds, False)
        result["stall_ms"] = round(result["ms_per_batch"] - args.step_ms, 2)
        rows.append(dict(row=f"{label}, in place", entry_bytes=gzip_bytes, **result))
        print(f"{label}, in place: {result['ms_per_batch']} ms/step", flush=True)
        result = time_read_ahead(gzip_cache, gzip_keys, args.batch, args.seconds, step_s)
        result["stall_ms"] = round(result["ms_per_batch"] - args.step_ms, 2)
        rows.append(dict(row=f"{label}, read-ahead", entry_bytes=gzip_bytes, **result))
        print(f"{label}, read-ahead: {result['ms_per_batch']} ms/step", flush=True)

        # The trainer's own read path: TrainingData.load_batch with text embeddings.
        from tune_data.buckets import PlannedImage
        from tune_data.discovery import DiscoveryReport, ImageRecord
        from tune_train.data import PreparedDataset, TrainingData, latent_key, text_key

        dataset = DatasetConfig(id="bench", instance_data_dir=str(root), resolution=1024)
        text_cache = TensorCache(root / "text", "text", {"model": "bench"})
        planned = []
        for index in range(args.entries):
            record = ImageRecord(f"img{index:05d}.jpg", 1024, 1024, f"caption {index % 64}", f"{index}-0")
            planned.append(PlannedImage(record, (1024, 1024), (1024, 1024), (0, 0, 1024, 1024)))
        data = TrainingData([dataset], cache_root=root, model_identity="bench", seed=0, progress=False)
        prepared = PreparedDataset(dataset, None, DiscoveryReport("bench", len(planned), (), ()),
                                   {(1024, 1024): planned}, fp32_cache, text_cache)
        data.prepared["bench"] = prepared
        generator = torch.Generator().manual_seed(1)
        for item in planned:
            fp32_cache.save(latent_key(prepared, item), {"latents": torch.randn(shape, generator=generator)})
        for caption in {item.record.caption for item in planned} | {""}:
            text_cache.save(text_key(text_cache, caption), {
                "prompt_embeds": torch.randn(512, 2560, generator=generator).to(torch.bfloat16),
            })
        by_key = {item.record.path: item for item in planned}
        paths = list(by_key)

        def load_batch(chunk):
            batch = [by_key[path] for path in chunk]
            return data.load_batch("bench", batch, [False] * len(batch))

        result = time_batches(load_batch, paths, args.batch, args.seconds, not args.cold)
        rows.append(dict(row="load_batch fp32 + text", entry_bytes=None, **result))
        print(f"load_batch: {result['batches_per_s']} batches/s", flush=True)

    print(f"\nbatch {args.batch}, latent {args.latent}, {args.entries} entries")
    print(f"{'row':<36} {'entry bytes':>12} {'batches/s':>10} {'ms/batch':>9} {'stall ms':>9}")
    for r in rows:
        size = f"{r['entry_bytes']:,}" if r["entry_bytes"] else "-"
        stall = f"{r['stall_ms']:.2f}" if "stall_ms" in r else "-"
        print(f"{r['row']:<36} {size:>12} {r['batches_per_s']:>10.1f} {r['ms_per_batch']:>9.2f} {stall:>9}")
    result = dict(
        benchmark="data_batch_loading",
        batch=args.batch, latent=args.latent, entries=args.entries, warm=not args.cold, step_ms=args.step_ms,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
                     torch=torch.__version__,
                     # A shared machine's other work slows every row: the figures are lower bounds.
                     load_average_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)]),
        rows=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
