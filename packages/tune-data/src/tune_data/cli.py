"""``tune-data``: look at datasets before training on them.

``tune-data inspect multidatabackend.json`` reads the dataset file the way the trainer does and
prints, per dataset, the files seen, kept and dropped (with reasons), the aspect-bucket histogram
and caption lengths; ``--json`` prints the same as JSON. Exit status 1 when a dataset is unusable.
Relative paths in the file are taken relative to the current directory.

``tune-data caption SOURCE --captioner NAME`` captions a folder of images, or each image dataset of
a ``multidatabackend.json``, with a registered captioner (see :mod:`tune_data.caption_pipeline`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from tune_data.buckets import plan_buckets
from tune_data.conditioning import ConditioningIndex, discover_conditioning, pair_conditioning
from tune_data.config import DatasetConfig, conditioning_for, load_dataset_configs
from tune_data.discovery import discover
from tune_data.storage import open_storage

_SHOWN_PER_REASON = 5


def _inspect_dataset(
    dataset: DatasetConfig, args: argparse.Namespace, configs: list[DatasetConfig] | None = None
) -> dict[str, Any]:
    info: dict[str, Any] = {"id": dataset.id, "dataset_type": dataset.dataset_type, "type": dataset.type}
    if dataset.held_out:  # dataset_type: eval
        info["held_out"] = True
    if dataset.ignored_keys:
        info["ignored_keys"] = list(dataset.ignored_keys)
    if dataset.dataset_type == "conditioning":
        return _inspect_conditioning(dataset, args, info)
    if not dataset.is_training_data:
        info["cache_dir"] = dataset.cache_dir
        return info
    try:
        storage = open_storage(dataset)
        report = discover(dataset, storage, metadata_dir=args.metadata_dir, progress=args.progress)
        if dataset.conditioning_data:
            # Images without a pair in every conditioning dataset are dropped ("missing conditioning").
            indexes = [_conditioning_index(c, args) for c in conditioning_for(dataset, configs or [])]
            report, _ = pair_conditioning(report, indexes)
            info["conditioning_data"] = list(dataset.conditioning_data)
    except (ValueError, NotImplementedError) as exc:
        info["error"] = str(exc)
        return info
    if not report.kept:
        info["error"] = f"dataset {dataset.id!r}: no image has a pair in its conditioning datasets"
        return info
    info["root"] = storage.root
    info["source"] = _describe_source(storage)
    if dataset.is_regularisation_data:
        info["is_regularisation_data"] = True
    info["seen"], info["kept"] = report.seen, len(report.kept)
    dropped: dict[str, list[str]] = {}
    for drop in report.dropped:
        dropped.setdefault(drop.reason, []).append(drop.path)
    info["dropped"] = dropped
    buckets = plan_buckets(report.kept, dataset, seed=args.seed)
    info["buckets"] = {f"{w}x{h}": len(items) for (w, h), items in buckets.items()}
    words = [len(record.caption.split()) for record in report.kept]
    info["caption_words"] = {
        "min": min(words),
        "mean": round(statistics.fmean(words), 2),
        "max": max(words),
        "empty": sum(1 for n in words if n == 0),
    }
    if dataset.is_video:
        frames = [record.frames for record in report.kept]
        info["video_frames"] = {"min": min(frames), "mean": round(statistics.fmean(frames), 1), "max": max(frames)}
    try:
        info["latent_cache"] = _latent_cache(dataset, buckets, args)
    except (ValueError, ConnectionError) as exc:  # a refused S3 credential: say so, report the rest
        info["latent_cache"] = {"location": None, "error": str(exc)}
    return info


def _conditioning_index(dataset: DatasetConfig, args: argparse.Namespace) -> ConditioningIndex:
    """Discover a conditioning dataset once per command (its image datasets and its own row share it)."""
    known = vars(args).setdefault("_conditioning_indexes", {})
    if dataset.id not in known:
        known[dataset.id] = discover_conditioning(
            dataset, open_storage(dataset), metadata_dir=args.metadata_dir, progress=args.progress
        )
    return known[dataset.id]


def _inspect_conditioning(dataset: DatasetConfig, args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    info["conditioning_type"] = dataset.conditioning_type
    try:
        index = _conditioning_index(dataset, args)
    except (ValueError, NotImplementedError) as exc:
        info["error"] = str(exc)
        return info
    report = index.report
    info["root"] = dataset.instance_data_dir
    info["seen"], info["kept"] = report.seen, len(report.kept)
    dropped: dict[str, list[str]] = {}
    for drop in report.dropped:
        dropped.setdefault(drop.reason, []).append(drop.path)
    info["dropped"] = dropped
    return info


def _latent_cache(dataset: DatasetConfig, buckets: dict, args: argparse.Namespace) -> dict[str, Any]:
    """What the dataset's latent cache holds: entries for kept images under the current settings
    (``present``), kept images without one (``missing``), and entries for anything else
    (``other``: other settings, models, or files that changed or left), with bytes."""
    from tune_data.cache import TensorCache, cache_root_for

    if dataset.cache_dir_vae:
        root, options = cache_root_for(dataset, dataset.cache_dir_vae)
    elif args.cache_dir:
        root, options = f"{str(args.cache_dir).rstrip('/')}/vae/{dataset.id}", None
    else:
        return {"location": None}
    cache = TensorCache(root, "latents", {}, storage_options=options, dataset=dataset.id)
    wanted = {
        (planned.cache_item_id, planned.record.identity)
        for images in buckets.values()
        for planned in images
    }
    settings = json.dumps(dataset.cache_settings(), sort_keys=True, separators=(",", ":"))
    present: set[tuple[str, str]] = set()
    present_bytes = other = other_bytes = unreadable = 0
    models: set[str] = set()
    for key, size in cache.entries():
        try:
            meta = cache.metadata(key)
        except Exception:  # torch missing, or a damaged entry: count it, inspect must not fail
            meta = {}
            unreadable += 1
        item = (meta.get("item", ""), meta.get("identity", ""))
        if meta.get("settings") == settings and item in wanted:
            if meta.get("model"):
                models.add(meta["model"])
            present.add(item)
            present_bytes += size
        else:
            other += 1
            other_bytes += size
    return {
        "location": str(cache.directory),
        "present": len(present),
        "missing": len(wanted) - len(present),
        "present_bytes": present_bytes,
        "other_entries": other,
        "other_bytes": other_bytes,
        "unreadable": unreadable,
        "models": sorted(models),
    }


def _describe_source(storage: Any) -> dict[str, Any]:
    """What a provider says about itself (``describe()``, never credentials), else its root."""
    describe = getattr(storage, "describe", None)
    if callable(describe):
        try:
            return dict(describe())
        except Exception as exc:  # a plugin's describe() must not break inspect
            return {"root": storage.root, "describe_error": str(exc)}
    return {"root": storage.root}


def _print_text(results: list[dict[str, Any]]) -> None:
    for info in results:
        held = ", held out for eval_loss" if info.get("held_out") else ""
        print(f"dataset {info['id']!r} ({info['dataset_type']}{held}, storage {info['type']})")
        if info.get("ignored_keys"):
            print(f"  ignored keys: {', '.join(info['ignored_keys'])}")
        if "error" in info:
            print(f"  ERROR: {info['error']}")
            continue
        if info["dataset_type"] == "conditioning":
            dropped = sum(len(paths) for paths in info["dropped"].values())
            print(
                f"  conditioning ({info['conditioning_type']}) {info['root']}: {info['seen']} files seen, "
                f"{info['kept']} kept, {dropped} dropped"
            )
            for reason, paths in sorted(info["dropped"].items()):
                print(f"    {reason}: {len(paths)} ({', '.join(paths[:_SHOWN_PER_REASON])})")
            continue
        if "seen" not in info:
            print(f"  text-embed cache: {info.get('cache_dir') or '(trainer default)'}")
            continue
        dropped = sum(len(paths) for paths in info["dropped"].values())
        source = info.get("source") or {}
        if set(source) - {"root"}:
            print("  source: " + ", ".join(f"{key} {value}" for key, value in source.items()))
        if info.get("is_regularisation_data"):
            print("  regularisation data")
        if info.get("conditioning_data"):
            print(f"  conditioning data: {', '.join(info['conditioning_data'])}")
        print(f"  {info['root']}: {info['seen']} files seen, {info['kept']} kept, {dropped} dropped")
        for reason, paths in sorted(info["dropped"].items()):
            shown = ", ".join(paths[:_SHOWN_PER_REASON])
            more = f", ... {len(paths) - _SHOWN_PER_REASON} more" if len(paths) > _SHOWN_PER_REASON else ""
            print(f"    {reason}: {len(paths)} ({shown}{more})")
        histogram = ", ".join(f"{size}: {n}" for size, n in info["buckets"].items())
        print(f"  buckets (width x height: images): {histogram}")
        words = info["caption_words"]
        print(
            f"  caption words: min {words['min']}, mean {words['mean']}, max {words['max']}"
            f"; empty captions: {words['empty']}"
        )
        if "video_frames" in info:
            frames = info["video_frames"]
            print(f"  video frames: min {frames['min']}, mean {frames['mean']}, max {frames['max']}")
        cache = info.get("latent_cache") or {}
        if cache.get("error"):
            print(f"  latent cache: ERROR {cache['error']}")
        elif not cache.get("location"):
            print("  latent cache: not configured (set cache_dir_vae, or pass --cache-dir / --config)")
        else:
            print(
                f"  latent cache {cache['location']}: {cache['present']} present "
                f"({cache['present_bytes']:,} bytes), {cache['missing']} missing; "
                f"{cache['other_entries']} other entries ({cache['other_bytes']:,} bytes: other settings, "
                f"models or changed files)" + (f"; {cache['unreadable']} unreadable" if cache["unreadable"] else "")
            )


def _inspect(args: argparse.Namespace) -> int:
    defaults = None
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            defaults = json.load(handle)
    if args.cache_dir is None and defaults:
        args.cache_dir = defaults.get("cache_dir") or defaults.get("--cache_dir")
    try:
        datasets = load_dataset_configs(args.multidatabackend, defaults=defaults)
    except ValueError as exc:
        print(f"tune-data: {exc}", file=sys.stderr)
        return 1
    results = [_inspect_dataset(dataset, args, datasets) for dataset in datasets]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_text(results)
    failed = any("error" in info or "error" in (info.get("latent_cache") or {}) for info in results)
    return 1 if failed else 0


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _caption(args: argparse.Namespace) -> int:
    # Imported here so that `tune-data inspect` never pays for the captioning modules.
    from tune_data.caption_cleanup import CleanupOptions
    from tune_data.caption_pipeline import caption_dataset, datasets_for_source
    from tune_data.captioning import build_captioner
    from tune_data.plugins import UnknownNameError

    options: dict[str, Any] = dict(args.option or [])
    for key in ("model", "device", "prompt"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options.setdefault("batch_size", args.batch_size)
    cleanup = CleanupOptions(
        trigger=args.trigger,
        trigger_position=args.trigger_position,
        shuffle_tags=args.shuffle_tags,
        keep_tags=args.keep_tags,
        seed=args.seed,
        max_length=args.max_length,
        length_unit=args.length_unit,
    )
    try:
        datasets = datasets_for_source(args.source)
        if not datasets:
            raise ValueError(f"{args.source}: no image dataset to caption")
        captioner = build_captioner(args.captioner, options)
    except (ValueError, FileNotFoundError, ImportError, UnknownNameError) as exc:
        print(f"tune-data: {exc}", file=sys.stderr)
        return 1
    results = []
    for dataset in datasets:
        try:
            result = caption_dataset(
                dataset, captioner, output=args.output, batch_size=args.batch_size, cleanup=cleanup,
                overwrite=args.overwrite, progress=not args.no_progress,
            )
        except (ValueError, ImportError) as exc:
            print(f"tune-data: {exc}", file=sys.stderr)
            return 1
        results.append(result.as_dict())
        if not args.json:
            failed = f", {len(result.failed)} undecodable" if result.failed else ""
            print(
                f"dataset {result.dataset_id!r}: {result.images} images, {result.captioned} captioned, "
                f"{result.skipped} already captioned{failed} -> {result.output}"
            )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune-data", description="Inspect and caption tune / SimpleTuner datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="discover each dataset and summarise it")
    inspect.add_argument("multidatabackend", help="path to multidatabackend.json")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--config", help="trainer config.json whose resolution, crop, ... are defaults")
    inspect.add_argument("--metadata-dir", help="reuse/write the discovery metadata cache here")
    inspect.add_argument("--seed", type=int, default=0, help="seed for random crops (default 0)")
    inspect.add_argument("--cache-dir", help="the trainer's cache_dir, to report latent caches of datasets "
                         "without cache_dir_vae (default: cache_dir of --config)")
    inspect.add_argument("--progress", action="store_true", help="show a progress bar per dataset")
    inspect.set_defaults(handler=_inspect)

    caption = commands.add_parser(
        "caption",
        help="caption a folder of images (or each image dataset of a multidatabackend.json)",
        description="Caption images with a registered captioner, in batches, resumably: images that "
        "already have a caption are skipped unless --overwrite.",
    )
    caption.add_argument("source", help="a folder of images, or a multidatabackend.json")
    caption.add_argument("--captioner", required=True, help="registered captioner: filename, blip, florence2, qwen2.5-vl, or a plugin's")
    caption.add_argument("--output", choices=("textfile", "jsonl", "parquet"), default="textfile",
                         help="a .txt beside each image (default), or one captions.jsonl / captions.parquet")
    caption.add_argument("--batch-size", type=int, default=8, help="images per captioner call (default 8)")
    caption.add_argument("--model", help="captioner model: hub name or local folder")
    caption.add_argument("--device", help="device for model captioners (default cuda when available)")
    caption.add_argument("--prompt", help="prompt / task for model captioners")
    caption.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE",
                         help="extra captioner option (value read as JSON when it parses); repeatable")
    caption.add_argument("--trigger", help="trigger word to insert in every caption")
    caption.add_argument("--trigger-position", choices=("prepend", "append", "replace"), default="prepend",
                         help="where the trigger goes; replace fills {trigger} placeholders (default prepend)")
    caption.add_argument("--shuffle-tags", action="store_true", help="shuffle comma-separated tags (seeded)")
    caption.add_argument("--keep-tags", type=int, default=0, help="leading tags --shuffle-tags keeps in place")
    caption.add_argument("--seed", type=int, default=0, help="seed of --shuffle-tags (default 0)")
    caption.add_argument("--max-length", type=int, help="longest caption, cut at a word boundary")
    caption.add_argument("--length-unit", choices=("words", "characters"), default="words",
                         help="unit of --max-length (default words)")
    caption.add_argument("--overwrite", action="store_true", help="caption images that already have a caption too")
    caption.add_argument("--json", action="store_true", help="print a JSON summary per dataset")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.set_defaults(handler=_caption)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tune-data`` console script."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
