"""Latent cache behaviours of a run: on-demand encoding, clearing each epoch, scanning for damage."""

from __future__ import annotations

import pytest
import torch

from tune_data.config import DatasetConfig
from tune_data.testing import make_shapes_dataset
from tune_train.data import TrainingData, latent_key


class Encoder:
    """A stand-in VAE: 8x average pooling, 4 channels; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


def prepared(tmp_path, count=6, **options):
    root = tmp_path / "data"
    if not root.exists():  # a second "run" reuses the files (rewriting them would change identities)
        make_shapes_dataset(root, count=count, size=(64, 64))
    config = DatasetConfig(
        id="shapes", instance_data_dir=str(root), caption_strategy="textfile", resolution=64,
        aspect_bucket_alignment=16, **options,
    )
    data = TrainingData([config], cache_root=tmp_path / "cache", model_identity="tiny", seed=0, progress=False)
    data.discover()
    return data, data.prepared["shapes"]


def entries(dataset):
    return [p for images in dataset.buckets.values() for p in images]


def load(data, items):
    latents = torch.stack(
        [data.prepared["shapes"].latent_cache.load(latent_key(data.prepared["shapes"], p))["latents"] for p in items]
    )
    return latents


def test_ondemand_skips_the_caching_pass_and_encodes_each_image_once_when_drawn(tmp_path):
    data, dataset = prepared(tmp_path, vae_cache_ondemand=True)
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 0
    assert encoder.images == 0 and dataset.latent_cache.entries() == []

    batch = entries(dataset)[:2]
    for planned in batch:  # load_batch reads text embeddings too; give it empty ones
        dataset.text_cache.save(dataset.text_cache.key(planned.record.caption, ""), {"e": torch.zeros(1)})
    latents, _ = data.load_batch("shapes", batch, [False, False])
    assert latents.shape == (2, 4, 8, 8) and encoder.images == 2
    assert len(dataset.latent_cache.entries()) == 2  # written to the cache
    again, _ = data.load_batch("shapes", batch, [False, False])
    assert encoder.images == 2 and torch.equal(again, latents)


def test_ondemand_without_an_encoder_says_what_to_call(tmp_path):
    data, dataset = prepared(tmp_path, count=2, vae_cache_ondemand=True)
    with pytest.raises(RuntimeError, match="vae_cache_ondemand.*cache_latents"):
        data.load_batch("shapes", entries(dataset)[:1], [False])


def test_clear_each_epoch_deletes_latents_and_moves_random_crops(tmp_path):
    root = make_shapes_dataset(tmp_path / "data", count=4, size=(96, 64))
    config = DatasetConfig(
        id="shapes", instance_data_dir=str(root), caption_strategy="textfile", resolution=64,
        aspect_bucket_alignment=16, crop=True, crop_style="random", crop_aspect="square",
        vae_cache_clear_each_epoch=True,
    )
    data = TrainingData([config], cache_root=tmp_path / "cache", model_identity="tiny", seed=0, progress=False)
    data.discover()
    dataset = data.prepared["shapes"]
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 4
    items = entries(dataset)
    before = [p.crop_box for p in items]

    assert data.end_epoch(0) == 4
    assert dataset.latent_cache.entries() == []
    after = [dataset.current(p).crop_box for p in items]
    assert after != before  # a 96x64 image has 32 px of room: new windows for the new epoch
    assert all(dataset.current(p).bucket == p.bucket for p in items)
    for planned in items:
        dataset.text_cache.save(dataset.text_cache.key(planned.record.caption, ""), {"e": torch.zeros(1)})
    data.load_batch("shapes", items, [False] * 4)
    assert encoder.images == 8  # encoded again, on demand, with the new crops
    assert len(dataset.latent_cache.entries()) == 4


def test_scan_recreate_re_encodes_only_the_corrupt_entry(tmp_path):
    data, dataset = prepared(tmp_path, scan_for_errors=True)
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 6
    victim = entries(dataset)[3]
    path = dataset.latent_cache.path(latent_key(dataset, victim))
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    healthy = {p.record.path: load(data, [p]) for p in entries(dataset) if p is not victim}

    # The next run: discovery's scan finds the damage, the caching pass re-encodes just that image.
    data, dataset = prepared(tmp_path, scan_for_errors=True)
    assert not dataset.latent_cache.has(latent_key(dataset, victim))
    encoder.images = 0
    assert data.cache_latents(encoder, batch_size=4) == 1
    assert encoder.images == 1
    scan = data.scan_latent_cache("shapes")
    assert scan.checked == 6 and scan.damaged == ()
    for planned in entries(dataset):
        if planned.record.path != victim.record.path:
            assert torch.equal(load(data, [planned]), healthy[planned.record.path])


def test_scan_finds_a_wrong_shape_and_sync_leaves_the_image_out(tmp_path):
    data, dataset = prepared(tmp_path, scan_for_errors=True, vae_cache_scan_behaviour="sync")
    encoder = Encoder()
    data.cache_latents(encoder, batch_size=4)
    victim = entries(dataset)[0]
    dataset.latent_cache.save(latent_key(dataset, victim), {"latents": torch.zeros(4, 4, 4)})

    data, dataset = prepared(tmp_path, scan_for_errors=True, vae_cache_scan_behaviour="sync")
    assert victim.record.path not in {p.record.path for p in entries(dataset)}
    assert len(entries(dataset)) == 5
    sampler = data.build_sampler(1)
    draws = iter(sampler)
    drawn = {planned.record.path for _ in range(10) for planned in next(draws)[1]}
    assert victim.record.path not in drawn and len(drawn) == 5  # two epochs of the five left
    scan = data.scan_latent_cache("shapes")
    assert scan.behaviour == "sync" and scan.damaged == () and scan.checked == 5
    encoder.images = 0
    assert data.cache_latents(encoder, batch_size=4) == 0 and encoder.images == 0


def test_scan_reports_the_shape_it_found(tmp_path):
    data, dataset = prepared(tmp_path, vae_cache_scan_behaviour="sync")
    data.cache_latents(Encoder(), batch_size=4)
    victim = entries(dataset)[2]
    dataset.latent_cache.save(latent_key(dataset, victim), {"latents": torch.zeros(4, 4, 4)})
    scan = data.scan_latent_cache("shapes")
    assert scan.damaged == ((victim.record.path, "latent shape [4, 4, 4], its bucket's are [4, 8, 8]"),)


def test_scan_behaviour_is_validated_with_its_key():
    with pytest.raises(Exception, match="vae_cache_scan_behaviour must be one of recreate, sync"):
        DatasetConfig(id="x", vae_cache_scan_behaviour="fix")


def test_a_video_dataset_is_refused_by_the_trainer_naming_why(tmp_path):
    config = DatasetConfig(id="clips", dataset_type="video", instance_data_dir=str(tmp_path))
    with pytest.raises(NotImplementedError, match="'clips'.*no model family trains on video yet.*disabled"):
        TrainingData([config], cache_root=tmp_path / "cache", model_identity="m", seed=0, progress=False)


class PromptEncoder:
    """A stand-in text encoder: one small embedding per caption, derived from its length."""

    def __init__(self):
        self.captions = 0

    def __call__(self, captions):
        self.captions += len(captions)
        return [{"prompt_embeds": torch.full((3, 4), float(len(c)))} for c in captions]


def test_text_embeddings_are_written_by_the_background_writer_and_a_failed_write_leaves_no_entry(
    tmp_path, monkeypatch
):
    import threading

    import safetensors.torch as st

    data, dataset = prepared(tmp_path, count=6)
    captions = sorted(data.captions())
    assert len(captions) >= 4
    real = st.save_file
    writers: list[str] = []

    def failing_on_the_third(tensors, path, metadata=None):
        writers.append(threading.current_thread().name)
        if len(writers) == 3:  # half of the bytes reach the disk, then the disk fails
            blob = st.save(tensors, metadata=metadata)
            with open(path, "wb") as handle:
                handle.write(blob[: len(blob) // 2])
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing_on_the_third)
    with pytest.raises(Exception, match="No space left on device"):
        data.cache_text(PromptEncoder(), batch_size=2)
    assert writers and all(name.startswith("tune-cache-writer") for name in writers)  # not the caller's thread

    cache = dataset.text_cache
    written = [c for c in captions if cache.has(cache.key(c, ""))]
    assert len(written) == 2  # the two before the failure; the failed one left no entry
    for caption in written:  # whole and right, never half an entry
        assert torch.equal(cache.load(cache.key(caption, ""))["prompt_embeds"], torch.full((3, 4), float(len(caption))))
    assert not list(cache.directory.rglob("*.tmp"))

    # The next run encodes only what is missing, and every caption reads back.
    monkeypatch.setattr(st, "save_file", real)
    encoder = PromptEncoder()
    assert data.cache_text(encoder, batch_size=2) == len(captions) - 2 == encoder.captions
    for caption in captions:
        assert torch.equal(cache.load(cache.key(caption, ""))["prompt_embeds"], torch.full((3, 4), float(len(caption))))


class EpochEncoder(Encoder):
    """An encoder whose output moves by 100 each epoch (as a sampling VAE's would differ): a latent
    read before an epoch-end clear is told apart from the one encoded after it."""

    generation = 0

    def __call__(self, pixels):
        return super().__call__(pixels) + 100.0 * self.generation


@pytest.mark.parametrize("crop_style", ["random", "center"])
def test_batches_read_ahead_are_the_batches_read_in_place_across_an_epoch_clear(tmp_path, crop_style):
    # Latents cleared each epoch: what was read ahead of the clear is stale and must not be used
    # (center crops keep their keys, random crops move); with and without read-ahead the run sees
    # the same batches, tensors and positions.
    root = make_shapes_dataset(tmp_path / "data", count=4, size=(96, 64))

    def run(read_ahead):
        config = DatasetConfig(
            id="shapes", instance_data_dir=str(root), caption_strategy="textfile", resolution=64,
            aspect_bucket_alignment=16, crop=True, crop_style=crop_style, crop_aspect="square",
            vae_cache_clear_each_epoch=True,
        )
        cache_root = tmp_path / f"cache{read_ahead}"
        data = TrainingData([config], cache_root=cache_root, model_identity="tiny", seed=0, progress=False)
        data.discover()
        encoder = EpochEncoder()
        data.cache_latents(encoder, batch_size=4)
        data.cache_text(PromptEncoder())
        sampler = data.build_sampler(2, read_ahead=read_ahead)
        seen = []
        for step in range(6):  # 2 batches per epoch: three epochs, two clears
            dataset_id, batch = sampler.next_batch()
            latents, prompts = data.load_batch(dataset_id, batch, [False, step % 2 == 1], step=step)
            seen.append(([p.record.path for p in batch], latents, [e["prompt_embeds"] for e in prompts], sampler.state_dict()))
            if (step + 1) % 2 == 0:
                data.end_epoch((step + 1) // 2)
                encoder.generation = (step + 1) // 2
        return seen

    in_place, ahead = run(0), run(3)
    for (paths, latents, prompts, state), (paths2, latents2, prompts2, state2) in zip(in_place, ahead):
        assert paths == paths2 and state == state2
        assert torch.equal(latents, latents2)
        assert all(torch.equal(a, b) for a, b in zip(prompts, prompts2))
    # Each epoch's latents are that epoch's encoding (none read before its clear).
    assert [round(float(latents.min()) / 100) for _, latents, _, _ in ahead] == [0, 0, 1, 1, 2, 2]


def test_compress_disk_cache_writes_gzip_entries_that_train_the_same(tmp_path):
    # The same dataset cached plain and compressed: .safetensors.gz entries, identical batches.
    root = make_shapes_dataset(tmp_path / "data", count=4, size=(64, 64))
    loaded = {}
    for compress in (False, True):
        config = DatasetConfig.from_dict(
            {"id": "shapes", "instance_data_dir": str(root), "caption_strategy": "textfile", "resolution": 64,
             "aspect_bucket_alignment": 16},
            defaults={"compress_disk_cache": compress},  # config.json's key reaches every dataset
        )
        data = TrainingData([config], cache_root=tmp_path / f"cache-{compress}", model_identity="tiny", seed=0,
                            progress=False)
        data.discover()
        data.cache_latents(Encoder(), batch_size=4)
        data.cache_text(PromptEncoder())
        dataset = data.prepared["shapes"]
        names = [p.name for p in (tmp_path / f"cache-{compress}").rglob("*.safetensors*")]
        suffix = ".safetensors.gz" if compress else ".safetensors"
        assert names and all(name.endswith(suffix) for name in names)
        sampler = data.build_sampler(2)
        loaded[compress] = [data.load_batch(*sampler.next_batch(), [False, False])[0] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(loaded[False], loaded[True]))


def test_caches_know_their_dataset_so_a_refused_s3_credential_names_it(tmp_path):
    # The S3 error itself is tested against moto in tune-data (test_data_s3_failures.py); here:
    # the trainer's caches carry the dataset id it names, and its text cache its text_embeds dataset.
    root = make_shapes_dataset(tmp_path / "data", count=2, size=(64, 64))
    configs = [
        DatasetConfig(id="shapes", instance_data_dir=str(root), caption_strategy="textfile", resolution=64,
                      aspect_bucket_alignment=16),
        DatasetConfig(id="embeds", dataset_type="text_embeds", default=True, cache_dir=str(tmp_path / "text")),
    ]
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="tiny", seed=0, progress=False)
    data.discover()
    assert data.prepared["shapes"].latent_cache.dataset == "shapes"
    assert data.prepared["shapes"].text_cache.dataset == "embeds"
