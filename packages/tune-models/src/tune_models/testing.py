"""Tiny random models and the conformance suite every model family must pass.

A plugin author tests a new family by subclassing :class:`ModelFamilyTests`::

    from tune_models.testing import ModelFamilyTests

    class TestMyFamily(ModelFamilyTests):
        family_name = "my-family"

        def build_tiny(self, path):
            return my_package.build_tiny_pipeline(path)  # saves a tiny diffusers folder, returns it

        # Only for a family with a flavour whose validation takes an image (validation_input):
        input_flavour = "edit"                   # the tiny folder is loaded as this flavour
        input_tiny_path_fixture = "edit_path"    # a fixture's tiny folder that flavour needs, if not the plain one
        input_fixtures = ("small_vae_area",)     # other fixtures that test needs (e.g. a monkeypatch)

The suite loads the saved folder through ``family.load`` (the normal path, no network), then
checks encoding shapes, ``predict``'s shape, that a few LoRA steps lower the loss, that the saved
LoRA reproduces the trained model inside the family's own diffusers pipeline, that the ComfyUI key
conversion round-trips, and that a flavour whose validation takes an image
(``validation_input``) generates from it. The built-in families pass the very same suite.

pytest and numpy are imported by the suite only, so this module is importable without them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from tune_models import adapters
from tune_models.family import LoadedModel, ModelFamily, ModelSource, get_family

try:  # the suite needs pytest; the builders below do not
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]


def build_tiny_pipeline(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny random pipeline of ``family`` (real classes, normal diffusers layout) at
    ``path`` and return it; ``family.load(ModelSource(pretrained_model_name_or_path=path), ...)``
    loads it back."""
    return Path(get_family(family).build_tiny(path, seed=seed))


def build_tiny_assistant_lora(
    pipeline_path: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    family: str = "z-image",
    rank: int = 4,
    seed: int = 1,
) -> Path:
    """Write a random assistant adapter for the tiny model at ``pipeline_path``, in the file
    format of that family's real assistant adapter."""
    return Path(get_family(family).build_tiny_assistant_lora(pipeline_path, out_file, rank=rank, seed=seed))


def write_gguf(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Write ``state_dict`` as a GGUF checkpoint, laid out like community GGUF conversions of
    diffusion transformers: 2-D ``.weight`` tensors whose rows split into 32-value blocks are
    quantised to Q8_0, everything else is stored as F32. Returns how many tensors were quantised.
    Needs the ``gguf`` package (``tune-models[gguf]``)."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch="tune-test")
    quantised = 0
    for key, tensor in state_dict.items():
        array = tensor.detach().float().cpu().numpy()
        if key.endswith(".weight") and tensor.ndim == 2 and tensor.shape[-1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
            quantised += 1
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantised


def load_tiny(family: ModelFamily, path: str | os.PathLike, flavour: str | None = "tiny", **source: Any) -> LoadedModel:
    """Load the tiny folder at ``path`` with ``flavour``'s defaults (its own checkpoint is never
    fetched); ``source`` adds :class:`~tune_models.family.ModelSource` fields, or replaces
    ``pretrained_model_name_or_path``."""
    source.setdefault("pretrained_model_name_or_path", str(path))
    return family.load(ModelSource(**source), flavour)


def assert_padding_is_masked(
    family: ModelFamily, model: LoadedModel, prompts: list[str], latents: torch.Tensor, *, mask_key: str
) -> None:
    """Assert that ``family.predict`` ignores prompt padding: the first of ``prompts`` (the
    shorter) is padded to the batch's length, so overwriting its ``prompt_embeds`` past its
    ``mask_key`` length with large values must not change the prediction for ``latents``."""
    cond = family.collate_prompts(family.encode_prompts(model, prompts), "cpu", torch.float32)
    sigmas = torch.full((len(prompts),), 0.5)
    with torch.no_grad():
        before = family.predict(model, latents, sigmas, cond)
        short = int(cond[mask_key][0].sum())
        cond["prompt_embeds"][0, short:] = 100.0
        after = family.predict(model, latents, sigmas, cond)
    torch.testing.assert_close(before, after)


def _require_pytest() -> Any:
    if pytest is None:  # pragma: no cover
        raise ImportError("tune_models.testing.ModelFamilyTests needs pytest: pip install pytest")
    return pytest


def _fixture(**kwargs: Any) -> Any:
    return _require_pytest().fixture(**kwargs) if pytest is not None else (lambda f: f)


class ModelFamilyTests:
    """Conformance tests for a :class:`~tune_models.family.ModelFamily` (subclass it as ``Test*``).

    Set :attr:`family_name`; override :meth:`build_tiny` when the family's own ``build_tiny`` is
    not the builder to use. Class attributes below tune sizes for slow families. A family with a
    flavour whose validation takes an image (:meth:`~tune_models.family.ModelFamily.validation_input`
    not None: an edit model, a refiner) sets :attr:`input_flavour` (and, where needed,
    :attr:`input_tiny_path_fixture` and :attr:`input_fixtures`); :meth:`test_validation_input`
    fails until it does.
    """

    family_name: str = ""
    flavour: str | None = "tiny"
    """Flavour whose defaults (steps, guidance) the tests use; its checkpoint is never fetched,
    the tiny folder is passed explicitly."""
    image_size: int = 64
    prompts: tuple[str, ...] = ("a red square on a blue background", "a cat")
    train_steps: int = 6
    learning_rate: float = 1e-2
    lora_rank: int = 4
    tiny_path_fixture: str | None = None
    """Name of a session fixture that already holds this family's tiny folder (a test module that
    builds one for its own tests); the suite then reuses it instead of building a second one."""
    input_flavour: str | None = None
    """A flavour whose validation takes an image (``family.validation_input(flavour)`` is not None):
    :meth:`test_validation_input` loads the tiny folder as that flavour and generates from a
    picture. Must be set when any flavour declares a ``validation_input``."""
    input_tiny_path_fixture: str | None = None
    """Name of a fixture giving a tiny folder :attr:`input_flavour` needs, when the family's plain
    tiny folder is not one (e.g. Qwen-Image-Edit needs a vision-language text encoder and its
    processor); None uses the plain tiny folder."""
    input_fixtures: tuple[str, ...] = ()
    """Other fixtures :meth:`test_validation_input` needs, requested by name (through
    ``request.getfixturevalue``) before it loads the model, e.g. a monkeypatch that scales a
    pipeline's preferred reference size down for the tiny VAE."""

    # ---------------------------------------------------------------- hooks for subclasses
    def build_tiny(self, path: Path) -> Path:
        return build_tiny_pipeline(self.family_name, path)

    # ---------------------------------------------------------------- fixtures and helpers
    @_fixture(scope="class")
    @classmethod
    def family(cls) -> ModelFamily:
        assert cls.family_name, "set family_name on your ModelFamilyTests subclass"
        return get_family(cls.family_name)

    @_fixture(scope="class")
    @classmethod
    def tiny_path(cls, request: Any, tmp_path_factory: Any) -> Path:
        if cls.tiny_path_fixture:
            return Path(request.getfixturevalue(cls.tiny_path_fixture))
        return Path(cls().build_tiny(tmp_path_factory.mktemp(f"tiny-{cls.family_name}")))

    def load(self, family: ModelFamily, tiny_path: Path, *, as_flavour: str | None = None, **source: Any) -> LoadedModel:
        """The tiny folder through ``family.load``, as :attr:`flavour` (or ``as_flavour``)."""
        source.setdefault("disable_assistant_lora", True)
        return family.load(ModelSource(pretrained_model_name_or_path=str(tiny_path), **source),
                           as_flavour or self.flavour)

    def pixels(self, batch: int = 2) -> torch.Tensor:
        """A fixed batch of simple images in [-1, 1]: a bright square on a dark ground."""
        size = self.image_size
        images = torch.full((batch, 3, size, size), -0.8)
        for i in range(batch):
            lo, hi = size // 4 + 4 * i, 3 * size // 4
            images[i, i % 3, lo:hi, lo:hi] = 0.9
        return images

    def train(self, family: ModelFamily, model: LoadedModel, *, alpha: float | None = None) -> list[float]:
        """A few LoRA steps on one fixed batch, with gradient checkpointing; returns the losses."""
        params = adapters.add_training_lora(
            model, rank=self.lora_rank, alpha=alpha or self.lora_rank, dropout=0.0, target=family.default_lora_target
        )
        latents = family.encode_images(model, self.pixels(len(self.prompts)))
        cond = family.collate_prompts(
            family.encode_prompts(model, list(self.prompts)), device=model.device, dtype=model.dtype
        )
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        sigmas = self.times(family, model, torch.linspace(0.3, 0.8, latents.shape[0]))
        noisy, target = self.noised(family, model, latents, noise, sigmas)
        if getattr(model.transformer, "_supports_gradient_checkpointing", False):
            model.transformer.enable_gradient_checkpointing()
        model.transformer.train()
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
        losses = []
        for _ in range(self.train_steps):
            pred = family.predict(model, noisy, sigmas, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.transformer.eval()
        return losses

    @staticmethod
    def times(family: ModelFamily, model: LoadedModel, levels: torch.Tensor) -> torch.Tensor:
        """What :meth:`ModelFamily.predict` takes for noise levels in [0, 1]: the sigmas
        themselves for a flow family, integer training timesteps for a DDPM family."""
        if family.prediction == "flow":
            return levels
        steps = int(model.scheduler.config.num_train_timesteps)
        return (levels * (steps - 1)).round().long()

    @staticmethod
    def noised(
        family: ModelFamily, model: LoadedModel, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy latents, training target)`` in the family's noise scheme (flow, or DDPM with
        the model's ``alphas_cumprod`` and prediction type)."""
        from tune_models.families._shared import noised

        return noised(family, model, latents, noise, times)

    def image(self, family: ModelFamily, pipeline: Any, seed: int = 0) -> Any:
        import numpy as np

        flavour = family.flavour(self.flavour)
        picture = family.generate(
            pipeline,
            self.prompts[0],
            width=self.image_size,
            height=self.image_size,
            steps=flavour.inference_steps,
            guidance=flavour.guidance,
            seed=seed,
        )
        return np.asarray(picture).astype(np.int16)

    @staticmethod
    def input_picture(seed: int, size: tuple[int, int] = (48, 32)) -> Any:
        """A random non-square RGB PIL picture (``size`` is width, height), fixed by ``seed``."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")

    # ---------------------------------------------------------------- the tests
    def test_registered_and_flavours(self, family: ModelFamily) -> None:
        assert isinstance(family, ModelFamily)
        assert family.default_flavour in family.flavours
        assert family.flavour(None) is family.flavours[family.default_flavour]
        for name, flavour in family.flavours.items():
            assert flavour.name == name and flavour.inference_steps > 0
        with _require_pytest().raises(ValueError, match="unknown model_flavour"):
            family.flavour("no-such-flavour")
        # Aliases (SimpleTuner's names) reach a real flavour and shadow none; refused names are neither.
        for alias, target in family.flavour_aliases.items():
            assert alias not in family.flavours and family.flavour(alias) is family.flavours[target], alias
        for name, reason in family.unavailable_flavours.items():
            assert name not in family.flavours and name not in family.flavour_aliases and reason, name
            with _require_pytest().raises(ValueError, match="not available in tune"):
                family.flavour(name)
        assert family.default_lora_target in family.lora_target_presets

    def test_load_from_saved_folder(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        assert model.family is family
        for component in (model.transformer, model.vae, model.text_encoder):
            assert not component.training, "components must load in eval mode"
            assert not any(p.requires_grad for p in component.parameters()), "components must load frozen"
        assert model.tokenizer is not None and model.scheduler is not None
        assert not model.has_assistant

    def test_lora_target_presets_match_modules(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        names = [name for name, _ in model.transformer.named_modules()]
        for preset, suffixes in family.lora_target_presets.items():
            for suffix in suffixes:
                if suffix.startswith("re:"):  # a regular expression over full module names
                    assert any(re.fullmatch(suffix[3:], n) for n in names), (preset, suffix)
                    continue
                assert any(n == suffix or n.endswith("." + suffix) for n in names), (preset, suffix)

    def test_encode_prompts(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        encoded = family.encode_prompts(model, list(self.prompts))
        assert len(encoded) == len(self.prompts)
        keys = set(encoded[0])
        for item in encoded:
            assert set(item) == keys and keys
            for tensor in item.values():
                assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
                assert torch.isfinite(tensor).all()
        again = family.encode_prompts(model, list(self.prompts[:1]))
        for key in keys:
            torch.testing.assert_close(again[0][key], encoded[0][key])

    def test_encode_images(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        pixels = self.pixels(2)
        latents = family.encode_images(model, pixels)
        assert latents.ndim == 4 and latents.shape[0] == 2
        assert latents.shape[-1] < pixels.shape[-1]
        assert torch.equal(latents, family.encode_images(model, pixels)), "encode_images must be deterministic"

    def test_predict_shape(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        latents = family.encode_images(model, self.pixels(2))
        cond = family.collate_prompts(family.encode_prompts(model, list(self.prompts)), model.device, model.dtype)
        with torch.no_grad():
            times = self.times(family, model, torch.tensor([0.2, 0.9]))
            out = family.predict(model, torch.randn_like(latents), times, cond)
        assert out.shape == latents.shape
        assert torch.isfinite(out).all()

    def test_lora_training_reduces_loss(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        frozen = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" not in n}
        losses = self.train(family, model)
        assert losses[-1] < losses[0], f"loss did not fall: {losses}"
        trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        for name, param in model.transformer.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]), f"base weight {name} changed"

    def test_lora_state_dict_loads_into_pipeline(self, family: ModelFamily, tiny_path: Path) -> None:
        trained = self.load(family, tiny_path)
        self.train(family, trained)
        state_dict = adapters.training_lora_state_dict(trained)
        assert state_dict and all(k.startswith(f"{family.lora_prefix}.") for k in state_dict)
        expected = self.image(family, family.validation_pipeline(trained))

        pipeline = family.validation_pipeline(self.load(family, tiny_path))
        plain = self.image(family, pipeline)
        pipeline.load_lora_weights(dict(state_dict))
        loaded = self.image(family, pipeline)
        assert (loaded != plain).any(), "loading the LoRA did not change the pipeline's output"
        assert abs(loaded - expected).max() <= 1, "the loaded LoRA does not reproduce the trained model"

    def test_saved_lora_file_keeps_alpha(self, family: ModelFamily, tiny_path: Path, tmp_path: Path) -> None:
        trained = self.load(family, tiny_path)
        self.train(family, trained, alpha=2 * self.lora_rank)
        file = adapters.save_training_lora(trained, tmp_path)
        expected = self.image(family, family.validation_pipeline(trained))
        pipeline = family.validation_pipeline(self.load(family, tiny_path))
        pipeline.load_lora_weights(str(tmp_path), weight_name=file.name)
        assert abs(self.image(family, pipeline) - expected).max() <= 1

    def test_comfyui_round_trip(self, family: ModelFamily, tiny_path: Path) -> None:
        model = self.load(family, tiny_path)
        self.train(family, model)
        state_dict = adapters.training_lora_state_dict(model)
        comfy = family.to_comfyui(state_dict)
        prefix = family.comfyui_key_prefix or "diffusion_model."
        assert comfy and all(k.startswith(prefix) for k in comfy)
        back = family.from_comfyui(comfy)
        assert set(back) == set(state_dict)
        for key, tensor in state_dict.items():
            assert torch.equal(back[key], tensor), key

    def test_flow_shift(self, family: ModelFamily) -> None:
        if family.prediction != "flow":
            _require_pytest().skip(f"{family.name} is not a flow-matching family")
        small = family.flow_shift(256, 256, shift=None, auto_shift=True)
        large = family.flow_shift(1024, 1024, shift=None, auto_shift=True)
        assert 0 < small < large
        assert family.flow_shift(1024, 1024, shift=3.0, auto_shift=False) == 3.0
        sigmas = torch.linspace(0, 1, 5)
        shifted = family.shift_sigmas(sigmas, 3.0)
        assert shifted[0] == 0 and shifted[-1] == 1 and (shifted >= sigmas).all()

    def test_validation_input(self, family: ModelFamily, request: Any) -> None:
        """Every flavour's ``validation_input`` is an allowed value; for :attr:`input_flavour`,
        ``generate(image=)`` gives the asked size, is deterministic for a seed and uses the
        picture (another picture, another image); an ``"optional-reference"`` flavour also
        generates without one."""
        import numpy as np

        pytest_ = _require_pytest()
        allowed = (None, "reference", "optional-reference", "image")
        declared = {}
        for name in family.flavours:
            kind = family.validation_input(name)
            assert kind in allowed, (
                f"{family.name}.validation_input({name!r}) is {kind!r}; expected one of {allowed}"
            )
            declared[name] = kind
        takes_image = sorted(name for name, kind in declared.items() if kind is not None)
        if self.input_flavour is None:
            if takes_image:
                pytest_.fail(
                    f"{family.name}'s flavours {takes_image} validate from an image (validation_input); set "
                    f"input_flavour on {type(self).__name__} to one of them so the suite tests generate(image=)"
                )
            pytest_.skip(f"every {family.name} flavour validates from text alone (validation_input is None)")

        flavour_name = self.input_flavour
        kind = family.validation_input(flavour_name)
        assert kind is not None, (
            f"input_flavour {flavour_name!r} validates from text alone (validation_input is None); "
            f"pick one of {takes_image}"
        )
        path = Path(request.getfixturevalue(self.input_tiny_path_fixture or "tiny_path"))
        for fixture in self.input_fixtures:
            request.getfixturevalue(fixture)
        model = self.load(family, path, as_flavour=flavour_name)
        pipeline = family.validation_pipeline(model)
        flavour = family.flavour(flavour_name)
        size = self.image_size
        settings = dict(
            width=size, height=size, steps=min(flavour.inference_steps, 2), guidance=flavour.guidance, seed=0
        )

        def generate(image: Any) -> Any:
            picture = family.generate(pipeline, self.prompts[0], image=image, **settings)
            assert picture.size == (size, size), (
                f"{flavour_name} generate(image=...) gave {picture.size}, asked for {(size, size)}"
            )
            return np.asarray(picture.convert("RGB")).astype(np.int16)

        first = generate(self.input_picture(1))
        again = generate(self.input_picture(1))
        assert np.array_equal(first, again), f"{flavour_name}: the same seed and picture gave different images"
        other = generate(self.input_picture(2))
        assert (first != other).any(), (
            f"{flavour_name}: a different input picture gave the same image (generate ignores image=)"
        )
        if kind == "optional-reference":
            generate(None)  # text to image when the run has no reference
