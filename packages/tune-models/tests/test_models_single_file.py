"""Single-file transformer checkpoints: ``pretrained_transformer_model_name_or_path`` (or
``pretrained_model_name_or_path``) naming one ``.safetensors`` file loads the denoiser through
diffusers' ``from_single_file``, with its config from the base checkpoint.

Z-Image is tested with a file in the *original* (Tongyi/ComfyUI) layout, written here by
inverting diffusers' own converter; Flux, FLUX.2 and SDXL with diffusers' layout saved as one file
(which diffusers reads for every class it has a single-file reader for).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tune_models.families import _shared
from tune_models.family import ModelSource, get_family

_ZIMAGE_RENAMES = (  # diffusers -> original, the inverse of convert_z_image_transformer_checkpoint_to_diffusers
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_k.", ".attention.k_norm."),
    (".attention.norm_q.", ".attention.q_norm."),
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
)


def zimage_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state dict in the original checkpoint's names: fused
    ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``model.diffusion_model.`` prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state_dict[key.replace(".to_q.", f".{p}.")] for p in ("to_q", "to_k", "to_v")]
            key, tensor = key.replace(".attention.to_q.", ".attention.qkv."), torch.cat(parts, dim=0)
        for new, old in _ZIMAGE_RENAMES:
            key = key.replace(new, old)
        out["model.diffusion_model." + key] = tensor.contiguous()
    return out


def perturbed(transformer: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """The transformer's weights plus noise, so a model equal to them came from the file, not the base."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in transformer.state_dict().items()}


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def zimage_weights(zimage, tiny_path) -> dict[str, torch.Tensor]:
    return perturbed(zimage.load(ModelSource(pretrained_model_name_or_path=str(tiny_path)), "tiny").transformer)


def test_zimage_original_layout_file_loads_equal(zimage, tiny_path, zimage_weights, tmp_path):
    file = tmp_path / "z_image_turbo_bf16.safetensors"
    original = zimage_original_layout(zimage_weights)
    assert any(".attention.qkv." in k for k in original) and all(k.startswith("model.diffusion_model.") for k in original)
    save_file(original, str(file))
    model = zimage.load(
        ModelSource(pretrained_model_name_or_path=str(tiny_path), pretrained_transformer_model_name_or_path=str(file)),
        "tiny",
    )
    assert_same_weights(model.transformer, zimage_weights)
    assert not model.transformer.training and not any(p.requires_grad for p in model.transformer.parameters())
    # The rest of the model is the base checkpoint's.
    base = zimage.load(ModelSource(pretrained_model_name_or_path=str(tiny_path)), "tiny")
    assert_same_weights(model.vae, base.vae.state_dict())


def test_file_as_pretrained_model_name_or_path_takes_the_rest_from_the_flavour(
    zimage, tiny_cache, zimage_weights, tmp_path, monkeypatch
):
    """A ComfyUI-style setup: the model key names only the transformer file; the VAE, the text
    encoder and the transformer's config come from the flavour's checkpoint (here the tiny one)."""
    monkeypatch.setenv("TUNE_TINY_CACHE", str(tiny_cache))
    file = tmp_path / "finetune.safetensors"
    save_file(zimage_original_layout(zimage_weights), str(file))
    model = zimage.load(ModelSource(pretrained_model_name_or_path=str(file)), "tiny")
    assert_same_weights(model.transformer, zimage_weights)
    assert model.extras["root"] == str(tiny_cache / "z-image-v1")
    with pytest.raises(ValueError, match="pretrained_transformer_model_name_or_path is set too"):
        zimage.load(
            ModelSource(pretrained_model_name_or_path=str(file), pretrained_transformer_model_name_or_path=str(file)),
            "tiny",
        )


@pytest.mark.parametrize("name", ["flux", "flux2", "sdxl"])
def test_diffusers_layout_file_loads_equal(name, request, tmp_path):
    """The generic loader (Flux), a family with its own component loading (FLUX.2) and a UNet
    family whose config lives in ``unet/`` (SDXL) all read a diffusers-layout single file."""
    family = get_family(name)
    path = request.getfixturevalue(f"{name}_path")  # the session's tiny model (see conftest)
    weights = perturbed(family.load(ModelSource(pretrained_model_name_or_path=str(path)), "tiny").transformer)
    file = tmp_path / f"{name}-transformer.safetensors"
    save_file(weights, str(file))
    model = family.load(
        ModelSource(pretrained_model_name_or_path=str(path), pretrained_transformer_model_name_or_path=str(file)),
        "tiny",
    )
    assert_same_weights(model.transformer, weights)


def test_a_file_of_another_family_is_a_clear_error(zimage, tiny_path, flux_path, tmp_path):
    flux = get_family("flux")
    file = tmp_path / "flux.safetensors"
    save_file(flux.load(ModelSource(pretrained_model_name_or_path=str(flux_path)), "tiny").transformer.state_dict(), str(file))
    with pytest.raises(ValueError) as info:
        zimage.load(
            ModelSource(pretrained_model_name_or_path=str(tiny_path), pretrained_transformer_model_name_or_path=str(file)),
            "tiny",
        )
    message = str(info.value)
    assert "pretrained_transformer_model_name_or_path" in message and "'z-image'" in message and str(file) in message


def test_a_class_without_a_single_file_reader_is_a_clear_error(tiny_path, tmp_path):
    from diffusers import PixArtTransformer2DModel

    file = tmp_path / "pixart.safetensors"
    save_file({"w": torch.zeros(1)}, str(file))
    source = ModelSource(pretrained_transformer_model_name_or_path=str(file))
    with pytest.raises(ValueError, match="no single-file reader for PixArtTransformer2DModel"):
        _shared.load_transformer(PixArtTransformer2DModel, source, str(tiny_path), dtype=torch.float32, label="pixart")


def test_is_single_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert _shared.is_single_file(str(tmp_path / "a.safetensors"))
    assert _shared.is_single_file("https://huggingface.co/org/repo/blob/main/model.safetensors")
    assert not _shared.is_single_file(str(tmp_path)) and not _shared.is_single_file("org/repo")
    assert not _shared.is_single_file(None)
