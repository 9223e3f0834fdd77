"""Text-encoder LoRAs (train_text_encoder) on the tiny SDXL, Flux.1 and SD3: the live encoding
agrees with the cached one and carries gradients to every encoder LoRA weight while the frozen
encoders' part stays the cached one; the exported keys and alpha load into the family's own
diffusers pipeline (``load_lora_weights``) and reproduce our encoder's output; ComfyUI names round
trip; Chroma (a T5-only Flux relative) refuses."""

from __future__ import annotations

import json

import pytest
import torch

from tune_models.family import ModelSource
from tune_models.text_encoder_lora import add_text_encoder_loras, check_support, metadata, state_dict

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["a red circle", ""]
#: Entries a frozen encoder makes (Flux's and SD3's T5): (key, rows) that must stay the cached ones.
FROZEN = {"flux": [("prompt_embeds", slice(None)), ("attention_mask", slice(None))],
          "sd3": [("prompt_embeds", slice(77, None))], "sdxl": []}


@pytest.fixture(params=["sdxl", "flux", "sd3"])
def case(request):
    name = request.param
    return name, request.getfixturevalue(name), request.getfixturevalue(f"{name}_path")


def _load(family, path):
    return family.load(ModelSource(pretrained_model_name_or_path=str(path)), "tiny", dtype=torch.float32, device="cpu")


def _perturb(params, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in params.values():
            for p in group:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))


def test_live_encoding_matches_the_cache_and_trains_only_the_lora(case):
    name, family, path = case
    model = _load(family, path)
    cached = family.encode_prompts(model, PROMPTS)
    params = add_text_encoder_loras(model, rank=2, alpha=4)
    assert sorted(params) == sorted(family.text_encoder_lora_components)
    live = family.encode_prompts_for_training(model, PROMPTS, cached)  # B = 0: no change yet
    for old, new in zip(cached, live):
        assert set(old) == set(new)
        for key in old:
            torch.testing.assert_close(new[key].detach().float(), old[key].float(), rtol=1e-4, atol=1e-5)

    _perturb(params)
    live = family.encode_prompts_for_training(model, PROMPTS, cached)
    for key, rows in FROZEN[name]:  # what only frozen encoders make is the cache's
        for old, new in zip(cached, live):
            torch.testing.assert_close(new[key][rows].detach().float(), old[key][rows].float())
    batch = family.collate_prompts(live, "cpu", torch.float32)
    assert batch["pooled_prompt_embeds"].requires_grad
    sum(v.pow(2).mean() for v in batch.values() if v.is_floating_point()).backward()
    for component in params:
        # Every layer up to the penultimate one (whose hidden state the prompt embeddings are)
        # learns; SDXL's CLIP-L last layer feeds nothing (its pooled output is unused), so its
        # LoRA gets no gradient, as in diffusers' own text-encoder LoRA training.
        named = {n: p for n, p in getattr(model, component).named_parameters() if "lora_" in n}
        assert named and all(p.grad is not None and p.grad.abs().sum() > 0
                             for n, p in named.items() if ".layers.0." in n), component
    frozen = [p for e in model.text_encoders for n, p in e.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)


def test_exported_keys_load_into_the_family_pipeline(case, tmp_path):
    from safetensors.torch import save_file

    name, family, path = case
    model = _load(family, path)
    params = add_text_encoder_loras(model, rank=2, alpha=4)  # alpha != rank: the header must carry it
    _perturb(params, seed=1)
    tensors = state_dict(model)
    assert tensors and all(k.split(".", 1)[0] in family.text_encoder_lora_components for k in tensors)
    assert all(".text_model.encoder.layers." in k for k in tensors)
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata(model), default=str)}
    save_file(tensors, tmp_path / "te.safetensors", metadata=header)

    pipe = family.pipeline_class().from_pretrained(path)
    pipe.load_lora_weights(str(tmp_path), weight_name="te.safetensors")
    ids = model.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    for component in family.text_encoder_lora_components:
        ours, theirs = getattr(model, component).eval(), getattr(pipe, component)
        with torch.no_grad():
            expected = ours(ids, output_hidden_states=True).hidden_states[-2]
            got = theirs(ids, output_hidden_states=True).hidden_states[-2]
            base = _load(family, path)
            plain = getattr(base, component)(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert (got - plain).abs().max() > 1e-3  # the LoRA does something

    comfy = family.to_comfyui(tensors, alpha=2.0)  # alpha == rank: the round trip is exact
    assert all(k.startswith(("lora_te1_", "lora_te2_")) for k in comfy)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in comfy)
    back = family.from_comfyui(comfy)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(back[key], value)


def test_a_family_without_text_encoder_loras_refuses(chroma):
    with pytest.raises(ValueError, match=r"train_text_encoder: model_family 'chroma'.*families that can: flux, sd3, sdxl"):
        check_support(chroma)


def test_registrations_declare_the_same_text_encoder_loras_as_the_families():
    """``tune check`` reads the registration (no torch import); it must agree with the family."""
    from tune_models.family import get_family
    from tune_models.registry import model_families

    for entry in model_families:
        family = get_family(entry.name)
        assert tuple(entry.info.get("text_encoder_loras") or ()) == tuple(family.text_encoder_lora_components), entry.name
