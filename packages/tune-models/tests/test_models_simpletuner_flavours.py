"""SimpleTuner's ``model_flavour`` names: a user's ``config.json`` must load the same checkpoint in
tune, or be refused with the reason (never a bare "unknown flavour").

The table is SimpleTuner's flavour name -> hub repository for the families tune carries (read from
its model definitions, December 2026). tune keeps its own names where they differ and accepts
SimpleTuner's as aliases (``ModelFamily.flavour_aliases``)."""

from __future__ import annotations

import pytest

from tune_models.family import get_family
from tune_models.registry import model_families

SIMPLETUNER_FLAVOURS: dict[str, dict[str, str]] = {
    "flux": {
        "dev": "black-forest-labs/flux.1-dev",
        "krea": "black-forest-labs/flux.1-krea-dev",
        "schnell": "black-forest-labs/flux.1-schnell",
        "kontext": "black-forest-labs/flux.1-kontext-dev",
        "fluxbooru": "terminusresearch/fluxbooru-v0.3",
        "libreflux": "jimmycarter/LibreFlux-SimpleTuner",
    },
    "flux2": {
        "dev": "black-forest-labs/FLUX.2-dev",
        "klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
        "klein-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    },
    "sd3": {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"},
    "sdxl": {
        "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
        "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
        "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
        "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9",
    },
    "qwen_image": {
        "v1.0": "Qwen/Qwen-Image",
        "v2.0": "Qwen/Qwen-Image-2512",
        "v2.1": "Qwen/Qwen-Image-2.1",
        "edit-v1": "Qwen/Qwen-Image-Edit",
        "edit-v2": "Qwen/Qwen-Image-Edit-2509",
        "edit-v2+": "Qwen/Qwen-Image-Edit-2509",
        "edit-v3": "Qwen/Qwen-Image-Edit-2511",
    },
    "chroma": {"base": "lodestones/Chroma1-Base", "hd": "lodestones/Chroma1-HD", "flash": "lodestones/Chroma1-Flash"},
    "sana": {
        "sana1.5-4.8b-1024": "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers",
        "sana1.5-1.6b-1024": "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
        "sana1.0-1.6b-2048": "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers",
        "sana1.0-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        "sana1.0-600m-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
        "sana1.0-600m-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    },
    "lumina2": {"2.0": "Alpha-VLLM/Lumina-Image-2.0", "neta-lumina": "terminusresearch/neta-lumina-v1"},
    "z_image": {
        "base": "Tongyi-MAI/Z-Image",
        "turbo": "Tongyi-MAI/Z-Image-Turbo",
        "turbo-ostris-v2": "Tongyi-MAI/Z-Image-Turbo",
        "ostris-de-turbo": "Tongyi-MAI/Z-Image-Turbo",  # with another transformer: refused
    },
}

ROWS = [(family, name, repo) for family, names in SIMPLETUNER_FLAVOURS.items() for name, repo in names.items()]


@pytest.mark.parametrize(("family_name", "flavour", "repo"), ROWS, ids=[f"{f}:{n}" for f, n, _ in ROWS])
def test_a_simpletuner_flavour_loads_the_same_checkpoint_or_is_refused_with_a_reason(family_name, flavour, repo):
    family = get_family(family_name)
    if flavour in family.unavailable_flavours:
        with pytest.raises(ValueError, match="not available in tune: .{40,}"):
            family.flavour(flavour)
        return
    chosen = family.flavour(flavour)
    assert chosen.pretrained.lower() == repo.lower(), (flavour, chosen.name)  # hub ids ignore case


def test_unknown_flavour_lists_simpletuner_names_too():
    with pytest.raises(ValueError) as info:
        get_family("sdxl").flavour("base-2.0")
    message = str(info.value)
    assert "choose one of: base, refiner, tiny" in message and "base-1.0 (= base)" in message


def test_registrations_match_the_families():
    """``tune check`` reads the registration (no torch); the run reads the family class."""
    for name in SIMPLETUNER_FLAVOURS:  # tune's own families (a third party's may declare less)
        entry, family = model_families.get(name), get_family(name)
        flavours = entry.info.get("flavours") or {}
        assert sorted(flavours) == sorted(family.flavours), entry.name
        assert entry.info.get("default_flavour") == family.default_flavour, entry.name
        assert dict(entry.info.get("flavour_aliases") or {}) == family.flavour_aliases, entry.name
        assert dict(entry.info.get("unavailable_flavours") or {}) == family.unavailable_flavours, entry.name
        assert entry.info.get("simpletuner_default_flavour") == family.simpletuner_default_flavour, entry.name
        if family.simpletuner_default_flavour:  # one of SimpleTuner's names for this family
            assert family.simpletuner_default_flavour in SIMPLETUNER_FLAVOURS[name], name


def test_flavour_questions_answer_the_same_for_an_alias():
    """What a family says of a flavour (references, validation input) holds for SimpleTuner's name too."""
    qwen, sdxl = get_family("qwen_image"), get_family("sdxl")
    for alias, name in (("edit-v1", "edit"), ("edit-v2", "edit-plus"), ("v1.0", "base")):
        assert qwen.accepts_references(alias) == qwen.accepts_references(name)
        assert qwen.prompts_use_references(alias) == qwen.prompts_use_references(name)
        assert qwen.validation_input(alias) == qwen.validation_input(name)
    assert qwen.accepts_references("edit-v1") and not qwen.accepts_references("v1.0")
    assert sdxl.validation_input("refiner-1.0") == "image" and sdxl.validation_input("base-1.0") is None
