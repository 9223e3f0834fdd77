"""group_offload_text_encoder / group_offload_vae: the encoders carry diffusers' group-offload
hooks, and the caches and the validation image are the same as without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

VALIDATION = {
    "--validation_disable": False,
    "--validation_prompt": "a blue square",
    "--validation_resolution": "32",
    "--validation_num_inference_steps": 2,
}


def _cached(root) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(root)): load_file(p) for p in sorted(root.rglob("*.safetensors"))}


def test_group_offloaded_encoders_cache_and_validate_as_without(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune import Trainer
    from tune_offload.strategies import is_group_offloaded

    def run(name, **keys):
        config = write_run(tmp_path / name, model=tiny_zimage, data=shapes_dir, steps=1, extra={**VALIDATION, **keys})
        trainer = Trainer.from_config(config, progress=False)
        return trainer, trainer.train()

    _, plain = run("plain")
    trainer, offloaded = run("offloaded", **{
        "--enable_group_offload": True, "--group_offload_text_encoder": True, "--group_offload_vae": True,
    })
    model = trainer._run.model
    assert is_group_offloaded(model.vae) and all(is_group_offloaded(e) for e in model.text_encoders)

    plain_cache, offloaded_cache = _cached(tmp_path / "plain" / "cache"), _cached(tmp_path / "offloaded" / "cache")
    assert plain_cache and plain_cache.keys() == offloaded_cache.keys()
    for name, tensors in plain_cache.items():
        assert tensors.keys() == offloaded_cache[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, offloaded_cache[name][key]), (name, key)

    image = "validation/step-000000/validation-32x32.png"
    plain_image = np.asarray(Image.open(tmp_path / "plain" / "output" / image))
    offloaded_image = np.asarray(Image.open(tmp_path / "offloaded" / "output" / image))
    assert plain_image.std() > 0 and np.array_equal(plain_image, offloaded_image)
    assert offloaded.losses == pytest.approx(plain.losses, rel=1e-5)


def test_block_level_groups_an_encoders_nested_blocks():
    """A CLIP text encoder keeps its layers below ``encoder``: block_level offload still makes one
    group per layer (diffusers alone would move the whole encoder as one group)."""
    import copy

    from transformers import CLIPTextConfig, CLIPTextModel
    from tune_offload.strategies import OffloadSettings, apply_offload

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    plain = CLIPTextModel(config).eval()
    offloaded = apply_offload(copy.deepcopy(plain), OffloadSettings(enable_group_offload=True), onload_device="cpu")
    layers = {name for name, _ in plain.named_modules() if name.rsplit(".", 1)[-1].isdigit()}
    hooked = {name for name, m in offloaded.named_modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("group_offloading")}
    assert len(layers) == 3 and layers <= hooked
    ids = torch.randint(2, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(plain(ids).last_hidden_state, offloaded(ids).last_hidden_state)


@pytest.mark.parametrize("key", ["group_offload_text_encoder", "group_offload_vae"])
def test_encoder_offload_without_enable_group_offload_names_both_keys(key):
    from tune_train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=f"{key} needs enable_group_offload: true"):
        TrainConfig(model_family="z-image", max_train_steps=1, **{key: True})
    assert getattr(TrainConfig(model_family="z-image", max_train_steps=1, enable_group_offload=True, **{key: True}), key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloaded_encoders_on_the_gpu_match_and_stay_off_it(tmp_path, tiny_zimage, shapes_dir, write_run, offload_type):
    from tune import Trainer

    def run(name, **keys):
        config = write_run(tmp_path / name, model=tiny_zimage, data=shapes_dir, steps=1,
                           extra={**VALIDATION, "--mixed_precision": "bf16", **keys})
        trainer = Trainer.from_config(config, progress=False)
        return trainer, trainer.train()

    _, plain = run("plain", **{"--enable_group_offload": True})
    trainer, offloaded = run("offloaded", **{
        "--enable_group_offload": True, "--group_offload_type": offload_type,
        "--group_offload_text_encoder": True, "--group_offload_vae": True,
    })
    model = trainer._run.model
    for component in (model.vae, *model.text_encoders):  # back off the GPU after caching and validation
        assert {p.device.type for p in component.parameters()} == {"cpu"}
    plain_cache, offloaded_cache = _cached(tmp_path / "plain" / "cache"), _cached(tmp_path / "offloaded" / "cache")
    assert plain_cache.keys() == offloaded_cache.keys()
    for name, tensors in plain_cache.items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(tensor, offloaded_cache[name][key], rtol=1e-2, atol=1e-2)
    image = "validation/step-000000/validation-32x32.png"
    a = np.asarray(Image.open(tmp_path / "plain" / "output" / image)).astype(int)
    b = np.asarray(Image.open(tmp_path / "offloaded" / "output" / image)).astype(int)
    assert np.abs(a - b).max() <= 2


def test_offloading_to_disk_keeps_each_models_files_apart(tmp_path, tiny_zimage):
    """diffusers names a group's file after the group (``layers_0_0``; the tiny Z-Image's
    transformer and its Qwen3 encoder both have ``layers``) and reads back a file it finds
    instead of writing its own: each offloaded model gets its own folder, emptied first, and the
    offloaded encoders give the same embeddings and latents as plain ones."""
    from tune_models.family import ModelSource, get_family
    from tune_train.config import TrainConfig
    from tune_train.setup_model import group_offload_encoders

    family = get_family("z-image")

    def load():
        return family.load(ModelSource(pretrained_model_name_or_path=str(tiny_zimage)), "tiny")

    disk = tmp_path / "spill"
    config = TrainConfig(model_family="z-image", max_train_steps=1, enable_group_offload=True,
                         group_offload_to_disk_path=str(disk), group_offload_text_encoder=True, group_offload_vae=True)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    earlier = load()  # an earlier run's encoder, other weights, leaves its files in the folder
    with torch.no_grad():
        for p in earlier.text_encoder.parameters():
            p.mul_(0.5)
    group_offload_encoders(earlier, config, torch.device("cpu"))
    with torch.no_grad():
        family.encode_prompts(earlier, ["a blue square"])

    plain, model = load(), load()
    assert group_offload_encoders(model, config, torch.device("cpu")) == ["text_encoder_1", "vae"]
    with torch.no_grad():
        for _ in range(2):  # the second pass reads the groups back from disk
            prompts = family.encode_prompts(model, ["a blue square"])
            latents = family.encode_images(model, pixels)
        expected_prompts = family.encode_prompts(plain, ["a blue square"])
        assert torch.equal(latents, family.encode_images(plain, pixels))
    for key, tensor in expected_prompts[0].items():
        assert torch.equal(tensor, prompts[0][key]), key
    assert {p.name for p in disk.iterdir()} == {"text_encoder_1", "vae"}
    assert any((disk / "text_encoder_1").glob("*.safetensors")) and any((disk / "vae").glob("*.safetensors"))


def test_group_offload_to_disk_of_the_trained_transformer_is_refused(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune import Trainer

    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
                       extra={"--enable_group_offload": True, "--group_offload_to_disk_path": str(tmp_path / "spill")})
    with pytest.raises(Exception, match="group_offload_to_disk_path cannot hold the transformer being trained"):
        Trainer.from_config(config, progress=False).train()
