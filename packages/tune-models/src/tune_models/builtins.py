"""Built-in plugins of tune_models (registered like any third-party plugin).

Registration uses import strings, so ``tune plugins`` and ``tune check`` list families and their
flavour defaults without importing torch or diffusers; a family module loads when a run asks for
it. Flavour facts come from each family's light ``flavours.py``, the same data its ``family.py``
turns into :class:`~tune_models.family.Flavour` objects.
"""

from __future__ import annotations

from collections.abc import Callable

from tune_data.plugins import hookimpl

from tune_models.families.chroma.flavours import CHROMA_FLAVOURS, CHROMA_UNAVAILABLE_FLAVOURS
from tune_models.families.flux.flavours import (
    FLUX_FLAVOURS,
    FLUX_LORA_TARGETS,
    FLUX_TRAINING_OPTIONS,
    FLUX_SIMPLETUNER_DEFAULT_FLAVOUR,
    FLUX_UNAVAILABLE_FLAVOURS,
)
from tune_models.families.flux2.flavours import (
    FLUX2_FLAVOURS,
    FLUX2_LORA_TARGETS,
    FLUX2_SIMPLETUNER_DEFAULT_FLAVOUR,
    FLUX2_TRAINING_OPTIONS,
)
from tune_models.families.lumina2.flavours import LUMINA2_FLAVOUR_ALIASES, LUMINA2_FLAVOURS, LUMINA2_LORA_TARGETS
from tune_models.families.qwen_image.flavours import (
    QWEN_IMAGE_FLAVOUR_ALIASES,
    QWEN_IMAGE_FLAVOURS,
    QWEN_IMAGE_LORA_TARGETS,
    QWEN_IMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
    QWEN_IMAGE_UNAVAILABLE_FLAVOURS,
)
from tune_models.families.sana.flavours import (
    SANA_FLAVOUR_ALIASES,
    SANA_FLAVOURS,
    SANA_LORA_TARGETS,
    SANA_SIMPLETUNER_DEFAULT_FLAVOUR,
    SANA_TRAINING_OPTIONS,
)
from tune_models.families.sd3.flavours import SD3_FLAVOURS, SD3_LORA_TARGETS
from tune_models.families.sdxl.flavours import (
    SDXL_FLAVOUR_ALIASES,
    SDXL_FLAVOURS,
    SDXL_LORA_TARGETS,
    SDXL_TRAINING_OPTIONS,
    SDXL_UNAVAILABLE_FLAVOURS,
)
from tune_models.families.zimage.flavours import (
    ZIMAGE_FLAVOURS,
    ZIMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
    ZIMAGE_UNAVAILABLE_FLAVOURS,
)

_ZIMAGE = "tune_models.families.zimage.family:FAMILY"
_FLUX = "tune_models.families.flux.family:FAMILY"
_FLUX2 = "tune_models.families.flux2.family:FAMILY"
_SD3 = "tune_models.families.sd3.family:FAMILY"
_CHROMA = "tune_models.families.chroma.family:FAMILY"
_QWEN_IMAGE = "tune_models.families.qwen_image.family:FAMILY"
_SANA = "tune_models.families.sana.family:FAMILY"
_LUMINA2 = "tune_models.families.lumina2.family:FAMILY"
_SDXL = "tune_models.families.sdxl.family:FAMILY"

@hookimpl
def tune_register_model_families(register: Callable[..., None]) -> None:
    register(
        "flux",
        _FLUX,
        description="Black Forest Labs FLUX.1 (12B MMDiT flow transformer, CLIP-L + T5-XXL text encoders)",
        flavours=FLUX_FLAVOURS,
        unavailable_flavours=FLUX_UNAVAILABLE_FLAVOURS,
        simpletuner_default_flavour=FLUX_SIMPLETUNER_DEFAULT_FLAVOUR,
        default_flavour="dev",
        default_lora_target="all",
        lora_targets=FLUX_LORA_TARGETS,
        training_options=FLUX_TRAINING_OPTIONS,
        text_encoder_loras=("text_encoder",),  # train_text_encoder: FluxFamily.text_encoder_lora_components
    )
    register(
        "flux2",
        _FLUX2,
        description="Black Forest Labs FLUX.2 (32B MMDiT flow transformer, Mistral-3 24B text encoder, 32-channel VAE)",
        flavours=FLUX2_FLAVOURS,
        simpletuner_default_flavour=FLUX2_SIMPLETUNER_DEFAULT_FLAVOUR,
        default_flavour="dev",
        default_lora_target="all",
        lora_targets=FLUX2_LORA_TARGETS,
        training_options=FLUX2_TRAINING_OPTIONS,
    )
    register(
        "sd3",
        _SD3,
        description="Stability AI Stable Diffusion 3.5 (MMDiT flow transformer, CLIP-L + CLIP-G + T5-XXL)",
        flavours=SD3_FLAVOURS,
        default_flavour="medium",
        default_lora_target="all",
        lora_targets=SD3_LORA_TARGETS,
        training_options={},
        text_encoder_loras=("text_encoder", "text_encoder_2"),
    )
    register(
        "sdxl",
        _SDXL,
        description="Stability AI Stable Diffusion XL 1.0 (DDPM UNet, epsilon or v-prediction, CLIP-L + OpenCLIP-G)",
        flavours=SDXL_FLAVOURS,
        flavour_aliases=SDXL_FLAVOUR_ALIASES,
        unavailable_flavours=SDXL_UNAVAILABLE_FLAVOURS,
        default_flavour="base",
        default_lora_target="all",
        lora_targets=SDXL_LORA_TARGETS,
        training_options=SDXL_TRAINING_OPTIONS,
        text_encoder_loras=("text_encoder", "text_encoder_2"),
        prediction="epsilon",  # the declared noise scheme, for `tune check` without importing torch
    )
    register(
        "chroma",
        _CHROMA,
        description="lodestones Chroma1 (Flux-derived flow transformer without CLIP, T5-XXL with attention masking)",
        flavours=CHROMA_FLAVOURS,
        unavailable_flavours=CHROMA_UNAVAILABLE_FLAVOURS,
        default_flavour="base",
        default_lora_target="all",
        lora_targets=FLUX_LORA_TARGETS,
        training_options={},
    )
    # ``qwen_image`` already matches ``qwen-image`` (names ignore case, - and _).
    register(
        "qwen_image",
        _QWEN_IMAGE,
        description="Alibaba Qwen-Image (20B MMDiT flow transformer, Qwen2.5-VL-7B text encoder, 3D causal VAE)",
        flavours=QWEN_IMAGE_FLAVOURS,
        flavour_aliases=QWEN_IMAGE_FLAVOUR_ALIASES,
        unavailable_flavours=QWEN_IMAGE_UNAVAILABLE_FLAVOURS,
        simpletuner_default_flavour=QWEN_IMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
        default_flavour="base",
        default_lora_target="all",
        lora_targets=QWEN_IMAGE_LORA_TARGETS,
        training_options={},
    )
    register(
        "sana",
        _SANA,
        description="NVIDIA Sana / SANA 1.5 (linear-attention DiT, Gemma-2-2B text encoder, 32x DC-AE)",
        flavours=SANA_FLAVOURS,
        flavour_aliases=SANA_FLAVOUR_ALIASES,
        simpletuner_default_flavour=SANA_SIMPLETUNER_DEFAULT_FLAVOUR,
        default_flavour="sana1.5-1.6b",
        default_lora_target="all",
        lora_targets=SANA_LORA_TARGETS,
        training_options=SANA_TRAINING_OPTIONS,
    )
    register(
        "lumina2",
        _LUMINA2,
        aliases=["lumina-image-2", "lumina"],
        description="Alpha-VLLM Lumina Image 2.0 (2.6B unified NextDiT flow transformer, Gemma-2-2B, Flux VAE)",
        flavours=LUMINA2_FLAVOURS,
        flavour_aliases=LUMINA2_FLAVOUR_ALIASES,
        default_flavour="base",
        default_lora_target="all",
        lora_targets=LUMINA2_LORA_TARGETS,
        training_options={},
    )
    info = {
        "flavours": ZIMAGE_FLAVOURS,
        "unavailable_flavours": ZIMAGE_UNAVAILABLE_FLAVOURS,
        "simpletuner_default_flavour": ZIMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
        "default_flavour": "turbo",
        "default_lora_target": "all",
        "lora_targets": ["all", "attention"],
        "training_options": {},
    }
    # ``z_image`` already matches ``z-image`` (names ignore case, - and _); ``zimage`` is an alias.
    register(
        "z-image",
        _ZIMAGE,
        aliases=["zimage"],
        description="Tongyi-MAI Z-Image / Z-Image-Turbo (6B flow transformer, Qwen3 text encoder)",
        **info,
    )
