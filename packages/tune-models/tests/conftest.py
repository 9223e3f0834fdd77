"""Shared fixtures: one tiny Z-Image (built by the ``tiny`` flavour) and one tiny assistant adapter
per test session; for each other built-in family a session fixture with the family and one with
its tiny folder (``sdxl``/``sdxl_path``, ...), built once however many modules use it; the tiny
Qwen-Image-Edit folder (``edit_path``) and ``small_vae_area`` for the edit pipelines; and
``one_thread`` for modules whose tiny matrices run faster on one thread."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread while a module runs (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    then restore it: tiny matrices run many times faster on one thread when the CPU is shared."""
    from tune_models.families._shared import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def zimage():
    from tune_models.family import get_family

    return get_family("z-image")


@pytest.fixture(scope="session")
def tiny_cache(zimage, tmp_path_factory) -> Path:
    """A ``$TUNE_TINY_CACHE`` in which the ``tiny`` flavour built its Z-Image on first use: the one
    tiny Z-Image every test of the session shares (``tiny_path``)."""
    from tune_models.family import ModelSource

    root = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNE_TINY_CACHE", str(root))
        zimage.load(ModelSource(), "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_path(tiny_cache) -> Path:
    """The tiny Z-Image's folder (what ``build_tiny_pipeline("z-image", path)`` saves)."""
    return tiny_cache / "z-image-v1"


@pytest.fixture(scope="session")
def assistant_file(tiny_path, tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_assistant_lora

    folder = tmp_path_factory.mktemp("assistant")
    return build_tiny_assistant_lora(tiny_path, folder / "zimage_turbo_training_adapter_v1.safetensors")


def _family_fixtures(fixture: str, family: str) -> tuple[object, object]:
    """Session fixtures ``<fixture>`` (the registered family) and ``<fixture>_path`` (its tiny
    pipeline folder, see :func:`tune_models.testing.build_tiny_pipeline`)."""

    @pytest.fixture(scope="session", name=fixture)
    def _family():
        from tune_models.family import get_family

        return get_family(family)

    @pytest.fixture(scope="session", name=f"{fixture}_path")
    def _path(tmp_path_factory) -> Path:
        from tune_models.testing import build_tiny_pipeline

        return build_tiny_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}"))

    return _family, _path


chroma, chroma_path = _family_fixtures("chroma", "chroma")
flux, flux_path = _family_fixtures("flux", "flux")
flux2, flux2_path = _family_fixtures("flux2", "flux2")
lumina, lumina_path = _family_fixtures("lumina", "lumina2")
qwen, qwen_path = _family_fixtures("qwen", "qwen-image")
sana, sana_path = _family_fixtures("sana", "sana")
sd3, sd3_path = _family_fixtures("sd3", "sd3")
sdxl, sdxl_path = _family_fixtures("sdxl", "sdxl")


@pytest.fixture(scope="session")
def edit_path(tmp_path_factory) -> Path:
    """A tiny Qwen-Image-Edit folder (vision-language text encoder and its processor), loadable as
    the ``edit`` and ``edit-plus`` flavours; built once for the edit tests and the conformance suite."""
    from tune_models.families.qwen_image.tiny import build_tiny_edit_pipeline

    return build_tiny_edit_pipeline(tmp_path_factory.mktemp("tiny-qwen-edit"), warm_start_steps=0)


@pytest.fixture(scope="session")
def edit_2511_path(tmp_path_factory) -> Path:
    """``edit_path``'s weights (the same seed) as a Qwen-Image-Edit-2511 folder: its transformer
    config sets ``zero_cond_t`` and ``model_index.json`` names ``QwenImageEditPlusPipeline``."""
    from tune_models.families.qwen_image.tiny import build_tiny_edit_pipeline

    return build_tiny_edit_pipeline(tmp_path_factory.mktemp("tiny-qwen-edit-2511"), warm_start_steps=0, zero_cond_t=True)


@pytest.fixture
def small_vae_area(monkeypatch):
    """The edit pipelines' 1024 x 1024 VAE/output area, scaled for the tiny 2x VAE to 32 x 32."""
    from tune_models.families.qwen_image.tiny import shrink_edit_area

    shrink_edit_area(monkeypatch)
