"""Qwen-Image-Edit flavours (``edit``, ``edit-plus``) checked against diffusers' edit pipelines:
prompt templates, prompt embeddings that read the reference image, and one denoising step with
the reference latents appended to the image tokens.

The edit pipelines resize the reference to about 1024 x 1024 pixels for the VAE; the tiny VAE
downsamples 2x (not 8x), so that area would make 512 x 512 latents. The pipeline tests scale the
area down to 32 x 32 (``small_vae_area``); everything else runs as published. The tiny edit
folder (``edit_path``) and ``small_vae_area`` are conftest fixtures, shared with the conformance
suite's ``test_validation_input`` for Qwen-Image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(seed: int, size=(32, 32)) -> Image.Image:
    return ModelFamilyTests.input_picture(seed, size)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_edit_flavours_take_references_and_base_does_not(qwen):
    assert {"edit", "edit-plus", "edit-2511"} < set(qwen.flavours)
    assert qwen.flavour("edit").pretrained == "Qwen/Qwen-Image-Edit"
    assert qwen.flavour("edit-plus").pretrained == "Qwen/Qwen-Image-Edit-2509"
    assert qwen.flavour("edit-2511").pretrained == "Qwen/Qwen-Image-Edit-2511"
    for flavour in ("edit", "edit-plus", "edit-2511"):
        assert qwen.accepts_references(flavour) and qwen.prompts_use_references(flavour)
        assert qwen.validation_input(flavour) == "reference"
    for flavour in ("base", "2512", "tiny"):
        assert not qwen.accepts_references(flavour) and not qwen.prompts_use_references(flavour)
        assert qwen.validation_input(flavour) is None


def test_edit_needs_a_checkpoint_with_a_processor(qwen, qwen_path):
    with pytest.raises(ValueError, match="needs the edit checkpoint's 'processor' folder"):
        load(qwen, qwen_path, flavour="edit")


@pytest.mark.parametrize("flavour", ["edit", "edit-plus", "edit-2511"])
def test_templates_match_the_pipelines(qwen, edit_path, flavour):
    from tune_models.families.qwen_image.edit import EDIT_STYLES

    model = load(qwen, edit_path, flavour=flavour)
    pipe = qwen.validation_pipeline(model)
    style = EDIT_STYLES[flavour]
    assert type(pipe).__name__ == style.pipeline
    assert (style.template, style.drop_tokens) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)


def test_edit_prompt_embeddings_read_the_reference(qwen, edit_path):
    """The cached embeddings equal QwenImageEditPipeline.encode_prompt with the image, and a
    different reference gives different embeddings for the same instruction."""
    model = load(qwen, edit_path, flavour="edit")
    pipe = qwen.validation_pipeline(model)
    a, b = _picture(1), _picture(2)
    ours = qwen.encode_prompts(model, ["make it red", "make it red"], reference_images=[[a], [b]])
    for item, picture in zip(ours, (a, b)):
        embeds, mask = pipe.encode_prompt(prompt=["make it red"], image=picture)
        torch.testing.assert_close(item["prompt_embeds"], embeds[0])
        assert mask is None and bool(item["prompt_embeds_mask"].all())
    assert not torch.allclose(ours[0]["prompt_embeds"], ours[1]["prompt_embeds"])
    with pytest.raises(ValueError, match="pass reference_images"):
        qwen.encode_prompts(model, ["make it red"])
    with pytest.raises(ValueError, match="takes 1 reference image"):
        qwen.encode_prompts(model, ["make it red"], reference_images=[[a, b]])


@pytest.mark.parametrize("flavour, references", [("edit", 1), ("edit-plus", 1), ("edit-plus", 2)])
def test_predict_with_references_is_the_edit_pipelines_velocity(qwen, edit_path, small_vae_area, flavour, references):
    """One Euler step of the edit pipeline from sigma 1 to 0 (no CFG) returns ``noise - v``;
    ``predict`` at sigma 1 with the same prompt embeddings (encoded with the references) and the
    references' latents must give the same ``v``: packing, concatenation order, img_shapes and
    the cut back to the target tokens all agree with the pipeline's transformer call."""
    model = load(qwen, edit_path, flavour=flavour)
    pictures = [_picture(10 + i) for i in range(references)]
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = qwen.validation_pipeline(model)
    out = pipe(
        image=pictures if flavour == "edit-plus" else pictures[0], prompt="make it red", height=32, width=32,
        num_inference_steps=1, true_cfg_scale=1.0, latents=qwen.pack(noise), output_type="latent", sigmas=[1.0],
    ).images
    prompts = qwen.encode_prompts(model, ["make it red"], reference_images=[pictures])
    cond = qwen.collate_prompts(prompts, "cpu", torch.float32)
    refs = [qwen.encode_images(model, _pixels(p)) for p in pictures]
    with torch.no_grad():
        velocity = qwen.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=refs)
        without = qwen.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(qwen.unpack(out, 16, 16), noise - velocity, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(velocity, without, atol=1e-4)  # the reference tokens matter


@pytest.mark.parametrize("references", [1, 2])
def test_edit_2511_predicts_the_pipelines_velocity_with_references_at_timestep_zero(
    qwen, edit_path, edit_2511_path, small_vae_area, references, caplog
):
    """Qwen-Image-Edit-2511: the same check as above through QwenImageEditPlusPipeline on a
    ``zero_cond_t`` transformer; and the same weights without ``zero_cond_t`` (2509's behaviour)
    predict another velocity, so training does modulate the reference tokens with timestep 0."""
    model = load(qwen, edit_2511_path, flavour="edit-2511")
    assert model.transformer.config.zero_cond_t and "does not set zero_cond_t" not in caplog.text
    pictures = [_picture(10 + i) for i in range(references)]
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = qwen.validation_pipeline(model)
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    out = pipe(
        image=pictures, prompt="make it red", height=32, width=32, num_inference_steps=1, true_cfg_scale=1.0,
        latents=qwen.pack(noise), output_type="latent", sigmas=[1.0],
    ).images
    cond = qwen.collate_prompts(qwen.encode_prompts(model, ["make it red"], reference_images=[pictures]), "cpu", torch.float32)
    refs = [qwen.encode_images(model, _pixels(p)) for p in pictures]
    plus = load(qwen, edit_path, flavour="edit-plus")  # the same seed: the same weights, no zero_cond_t
    with torch.no_grad():
        velocity = qwen.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=refs)
        as_2509 = qwen.predict(plus, noise, torch.tensor([1.0]), cond, reference_latents=refs)
    torch.testing.assert_close(qwen.unpack(out, 16, 16), noise - velocity, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(velocity, as_2509, atol=1e-4)


def test_edit_2511_warns_on_a_transformer_without_zero_cond_t(qwen, edit_path, caplog):
    with caplog.at_level("WARNING"):
        load(qwen, edit_path, flavour="edit-v3")  # SimpleTuner's name for edit-2511, on a 2509-style folder
    assert "does not set zero_cond_t" in caplog.text and "Its flavour is edit-plus" in caplog.text


def test_generate_edits_the_given_image(qwen, edit_path, small_vae_area):
    model = load(qwen, edit_path, flavour="edit")
    pipe = qwen.validation_pipeline(model)
    kwargs = dict(width=32, height=32, steps=2, guidance=4.0, seed=0)
    first = np.asarray(qwen.generate(pipe, "make it red", image=_picture(1), **kwargs))
    again = np.asarray(qwen.generate(pipe, "make it red", image=_picture(1), **kwargs))
    other = np.asarray(qwen.generate(pipe, "make it red", image=_picture(2), **kwargs))
    assert first.shape == (32, 32, 3) and np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 0
