"""Helpers several families use: component locations, tiny-model parts, fused-LoRA algebra.

Nothing here names a model; a family module imports what it needs. Heavy libraries (diffusers,
transformers, tokenizers) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tune_models.family import ModelSource
from tune_models.sources import SINGLE_FILE_SUFFIXES, is_single_file  # noqa: F401  (families use them from here)


# ----------------------------------------------------------------------------- loading
def load_kwargs(source: ModelSource) -> dict[str, Any]:
    """``revision`` / ``variant`` for ``from_pretrained``, when given."""
    kwargs: dict[str, Any] = {}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.variant:
        kwargs["variant"] = source.variant
    return kwargs


def subfolder(default: str | None, override: str | None) -> str | None:
    """Resolve a component's subfolder; ``"none"`` (any case) or ``""`` means the location itself."""
    if override is None:
        return default
    return None if override.strip().lower() in ("", "none") else override


def load_vae(vae_class: Any, location: str, *, is_root: bool, dtype: torch.dtype, **kwargs: Any) -> Any:
    """A VAE from a pipeline folder (``vae/``) or a VAE folder / repository itself."""
    if is_root:
        return vae_class.from_pretrained(location, subfolder="vae", torch_dtype=dtype, **kwargs)
    local = Path(location)
    if local.is_dir():
        sub = "vae" if (local / "vae" / "config.json").is_file() else None
        return vae_class.from_pretrained(location, subfolder=sub, torch_dtype=dtype, **kwargs)
    try:
        return vae_class.from_pretrained(location, subfolder="vae", torch_dtype=dtype, **kwargs)
    except OSError:  # a bare VAE repository
        return vae_class.from_pretrained(location, torch_dtype=dtype, **kwargs)


def load_text_encoder(encoder_class: Any, location: str, *, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(text encoder, tokenizer)`` from ``ModelSource.pretrained_text_encoder_model_name_or_path``:
    a pipeline folder or repository (``text_encoder/`` and ``tokenizer/``) or the encoder's own
    folder or repository (config and tokenizer at its root). The base model's ``revision`` and
    ``variant`` describe another repository, so they are not passed."""
    from transformers import AutoTokenizer

    local = Path(location)
    if local.is_dir():
        nested = (local / "text_encoder" / "config.json").is_file()
        encoder = encoder_class.from_pretrained(location, subfolder="text_encoder" if nested else "", dtype=dtype)
        tokenizer_sub = "tokenizer" if (local / "tokenizer").is_dir() else ""
        return encoder, AutoTokenizer.from_pretrained(location, subfolder=tokenizer_sub)
    try:
        encoder = encoder_class.from_pretrained(location, subfolder="text_encoder", dtype=dtype)
        return encoder, AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
    except OSError:  # the encoder's own repository
        return encoder_class.from_pretrained(location, dtype=dtype), AutoTokenizer.from_pretrained(location)


def resolve_source(family: Any, source: ModelSource, flavour: Any) -> tuple[ModelSource, str]:
    """``(source, root)``: the diffusers folder or repository every component is read from.

    ``pretrained_model_name_or_path`` naming one file (a single-file transformer such as a
    ComfyUI/BFL ``.safetensors``) means "this denoiser, the rest of the flavour's checkpoint":
    the file becomes the transformer location and the flavour's default repository the root, so
    the VAE, the encoders and the transformer's config come from there. The ``tiny`` flavour's
    sentinel is built on first use."""
    import attrs

    root = source.pretrained_model_name_or_path or flavour.pretrained
    if is_single_file(root):
        if source.pretrained_transformer_model_name_or_path:
            raise ValueError(
                f"pretrained_model_name_or_path {root!r} is a single file (a transformer checkpoint) and "
                "pretrained_transformer_model_name_or_path is set too; give the file in one of them"
            )
        source = attrs.evolve(source, pretrained_transformer_model_name_or_path=root)
        root = flavour.pretrained
    tiny = family.flavours.get("tiny")
    if tiny is not None and root == tiny.pretrained:
        root = tiny_checkpoint(f"{family.name}-v1", lambda path: family.build_tiny(path))
    return source, root


def _gguf_options(location: str, dtype: torch.dtype) -> dict[str, Any]:
    """``from_single_file`` options for a GGUF file: diffusers' GGUF quantiser keeps the file's
    quantised weights (Q8_0, Q4_K, ...) as they are and dequantises each layer's weight when it
    runs, computing in ``dtype``. Needs the ``gguf`` package."""
    if not str(location).lower().endswith(".gguf"):
        return {}
    try:
        import gguf  # noqa: F401 - diffusers needs it to read the file
    except ImportError as exc:
        raise ImportError(
            f"{location!r} is a GGUF checkpoint, which needs the gguf package: "
            'pip install "tune-models[gguf]"'
        ) from exc
    from diffusers import GGUFQuantizationConfig

    return {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype)}


def load_transformer(
    model_class: Any,
    source: ModelSource,
    root: str,
    *,
    dtype: torch.dtype,
    label: str,
    default_subfolder: str = "transformer",
    **kwargs: Any,
) -> Any:
    """The denoiser: ``from_pretrained`` of the transformer location (``source``'s, else ``root``)
    and subfolder, or, when that location is one file, diffusers' ``from_single_file`` with the
    architecture's config read from ``root``'s ``default_subfolder`` (a single file carries no
    config). diffusers converts original layouts (BFL, ComfyUI, Stability, ...) for the classes it
    has a converter for, and reads its own layout saved as one file for those classes too."""
    location = source.pretrained_transformer_model_name_or_path or root
    single = is_single_file(location)
    if source.transformer_quantization is not None:
        if str(location).lower().endswith(".gguf"):
            raise ValueError(
                f"{location!r} is a GGUF checkpoint, already quantised; it cannot be quantised again "
                "while loading (quantize_via pipeline): drop base_model_precision / quantization_config"
            )
        config_location, config_sub = (root, default_subfolder) if single else (
            location, subfolder(default_subfolder, source.pretrained_transformer_subfolder))
        kwargs = {**kwargs, "quantization_config": _quantization_config(
            source.transformer_quantization, model_class, config_location, config_sub, revision=kwargs.get("revision"))}
    if not single:
        return model_class.from_pretrained(
            location,
            subfolder=subfolder(default_subfolder, source.pretrained_transformer_subfolder),
            torch_dtype=dtype,
            **kwargs,
        )
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    where = (
        f"the single-file transformer {location!r} (pretrained_transformer_model_name_or_path, or "
        f"pretrained_model_name_or_path naming a file) for model_family {label!r}"
    )
    if model_class.__name__ not in SINGLE_FILE_LOADABLE_CLASSES or not hasattr(model_class, "from_single_file"):
        raise ValueError(
            f"cannot load {where}: diffusers has no single-file reader for {model_class.__name__}; "
            "give a diffusers folder (with config.json) instead"
        )
    extra = {"config_revision": kwargs["revision"]} if kwargs.get("revision") else {}
    if "quantization_config" in kwargs:
        extra["quantization_config"] = kwargs["quantization_config"]
    extra.update(_gguf_options(location, dtype))
    try:
        model = model_class.from_single_file(
            location, config=root, subfolder=default_subfolder, torch_dtype=dtype, **extra
        )
    except (KeyError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise ValueError(
            f"cannot load {where}: diffusers could not read it as a {model_class.__name__} "
            f"({type(exc).__name__}: {exc}); is it a checkpoint of this family?"
        ) from exc
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise ValueError(
            f"cannot load {where}: it lacks {len(missing)} of {model_class.__name__}'s weights "
            f"(e.g. {missing[0]}); is it a checkpoint of this family?"
        )
    return model


def _quantization_config(
    quantization: Any, model_class: Any, location: str, sub: str | None, *, revision: str | None
) -> Any:
    """``ModelSource.transformer_quantization`` as a diffusers config: a function of the empty
    model is called with ``model_class`` built from its config on the meta device (no weights
    read, so it costs well under a second even for a 20 B model)."""
    if not callable(quantization):
        return quantization
    from accelerate import init_empty_weights

    config = model_class.load_config(location, subfolder=sub, **({"revision": revision} if revision else {}))
    with init_empty_weights():
        skeleton = model_class.from_config(config)
    return quantization(skeleton)


def freeze(*modules: Any, device: str | torch.device) -> None:
    for module in modules:
        if module is None:
            continue
        module.requires_grad_(False)
        module.eval()
        module.to(device)


def component_suffixes(count: int) -> list[str]:
    """Suffixes of the first ``count`` text encoders' names (``text_encoder``, ``text_encoder_2``, ...)."""
    return ["" if i == 0 else f"_{i + 1}" for i in range(count)]


def load_components(
    source: ModelSource,
    root: str,
    *,
    transformer_class: str,
    text_encoder_classes: Sequence[str],
    dtype: torch.dtype,
    device: str | torch.device,
    label: str = "",
) -> dict[str, Any]:
    """``LoadedModel`` fields (frozen, eval mode, on ``device``) from a diffusers folder ``root``:
    the diffusers ``transformer_class`` (from ``source``'s transformer location when given, see
    :func:`load_transformer`; ``label`` names the family in its errors), an
    ``AutoencoderKL`` (likewise), the transformers ``text_encoder_classes`` in ``text_encoder``,
    ``text_encoder_2``, ... with ``AutoTokenizer`` in ``tokenizer``, ``tokenizer_2``, ..., and
    a ``FlowMatchEulerDiscreteScheduler``."""
    import diffusers
    import transformers

    kwargs = load_kwargs(source)
    hub_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
    components: dict[str, Any] = {
        "transformer": load_transformer(
            getattr(diffusers, transformer_class), source, root, dtype=dtype, label=label, **kwargs
        )
    }
    vae_location = source.pretrained_vae_model_name_or_path or root
    components["vae"] = load_vae(
        diffusers.AutoencoderKL, vae_location, is_root=vae_location == root, dtype=dtype, **kwargs
    )
    for suffix, class_name in zip(component_suffixes(len(text_encoder_classes)), text_encoder_classes):
        encoder_class = getattr(transformers, class_name)
        if not suffix and source.pretrained_text_encoder_model_name_or_path:
            components["text_encoder"], components["tokenizer"] = load_text_encoder(
                encoder_class, source.pretrained_text_encoder_model_name_or_path, dtype=dtype
            )
            continue
        components[f"text_encoder{suffix}"] = encoder_class.from_pretrained(
            root, subfolder=f"text_encoder{suffix}", dtype=dtype, **kwargs
        )
        components[f"tokenizer{suffix}"] = transformers.AutoTokenizer.from_pretrained(
            root, subfolder=f"tokenizer{suffix}", **hub_kwargs
        )
    components["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        root, subfolder="scheduler", **hub_kwargs
    )
    freeze(*(v for k, v in components.items() if k == "transformer" or k == "vae" or k.startswith("text_encoder")), device=device)
    return components


def stack_prompts(
    items: list[dict[str, torch.Tensor]],
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    label: str,
    keys: Sequence[str],
) -> dict[str, Any]:
    """Batch cached prompt dicts of equal length: each of ``keys`` stacked, cast to ``dtype``."""
    if not items:
        raise ValueError("collate_prompts needs at least one prompt")
    lengths = {item["prompt_embeds"].shape[0] for item in items}
    if len(lengths) != 1:
        raise ValueError(f"cached {label} prompts have different lengths {sorted(lengths)}; re-cache the text embeds")
    return {key: torch.stack([i[key] for i in items]).to(device=device, dtype=dtype) for key in keys}


def tiny_checkpoint(name: str, build: Callable[[Path], Any]) -> str:
    """Build (once per machine) and return a tiny flavour's folder under ``$TUNE_TINY_CACHE``."""
    root = Path(os.environ.get("TUNE_TINY_CACHE", Path(tempfile.gettempdir()) / "tune-tiny"))
    target = root / name
    if not (target / "model_index.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        build(staging)
        try:
            os.replace(staging, target)  # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# ----------------------------------------------------------------------------- 2x2 latent tokens
def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x (H/2 * W/2) x 4C``: 2x2 patches as tokens, the layout of
    ``FluxPipeline._pack_latents`` and ``QwenImagePipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_2x2` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


# ----------------------------------------------------------------------------- guidance input
GUIDANCE_MODES = ("constant", "random-range")


def guidance_settings(current: dict[str, Any], options: Any, prefix: str) -> dict[str, Any]:
    """A guidance-distilled family's guidance-input settings (``mode``, ``value``, ``min``,
    ``max``) updated from the run's ``<prefix>_guidance_mode/_value/_min/_max`` options; errors
    name those keys."""
    guidance = dict(current)
    mode = options.get(f"{prefix}_guidance_mode")
    if mode is not None:
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"{prefix}_guidance_mode must be one of {', '.join(GUIDANCE_MODES)}, got {mode!r}")
        guidance["mode"] = mode
    for key in ("value", "min", "max"):
        value = options.get(f"{prefix}_guidance_{key}")
        if value is not None:
            guidance[key] = float(value)
    if guidance["mode"] == "random-range" and not guidance["min"] <= guidance["max"]:
        raise ValueError(
            f"{prefix}_guidance_min ({guidance['min']}) must not exceed {prefix}_guidance_max ({guidance['max']})"
        )
    return guidance


def guidance_values(cfg: dict[str, Any], batch: int, device: Any) -> torch.Tensor:
    """The guidance input for a training batch from :func:`guidance_settings`' dict: a random
    range draws from torch's global generator, which the trainer seeds per step."""
    if cfg["mode"] == "random-range":
        values = cfg["min"] + (cfg["max"] - cfg["min"]) * torch.rand(batch)
    else:
        values = torch.full((batch,), float(cfg["value"]))
    return values.to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------- tiny parts
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw a tiny model's random weights from ``seed`` without moving the caller's global RNG
    (a test building a tiny model mid-session must not change what later tests draw)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Pin torch to one thread for the block, then restore the setting: tiny matrices run many
    times faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_lora_file(
    out_file: str | os.PathLike, shapes: dict[str, tuple[int, int]], *, rank: int, seed: int, std: float
) -> Path:
    """Save a random LoRA (``<module>.lora_A.weight`` ``[rank, in]`` and ``.lora_B.weight``
    ``[out, rank]`` per ``module -> (out, in)``, drawn in that order from ``seed``) as one
    safetensors file: the tiny stand-in for a published assistant adapter."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file


TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    mid_block_add_attention=False,
    # scaling_factor / shift_factor are measured at build time (see ``calibrate_vae``).
)
"""The tiny models' VAE: two blocks (2x downsampling: 64 px -> 32x32 latents), 16 latent
channels, no mid-block attention (it dominates CPU time)."""


def tiny_vae() -> Any:
    """A random :data:`TINY_VAE`, calibrated (draws from torch's global generator)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**TINY_VAE).eval()
    calibrate_vae(vae)
    return vae


def tiny_clip(encoder_class: Any, tokenizer: Any, config: dict[str, Any]) -> Any:
    """A random CLIP text model of ``encoder_class`` for :func:`clip_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    return encoder_class(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    ).eval()


def tiny_t5(tokenizer: Any, config: dict[str, Any]) -> Any:
    """A random T5 encoder for :func:`t5_tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **config)
    ).eval()


def save_tiny(
    family: Any,
    path: str | os.PathLike,
    components: dict[str, Any],
    *,
    warm_start_steps: int,
    seed: int,
    shift: float = 1.0,
    extras: dict[str, Any] | None = None,
    flavour: str = "tiny",
    pipeline_class: type | None = None,
) -> Path:
    """Warm-start a tiny model's transformer (see :func:`warm_start`) as ``flavour`` and save
    ``components`` (``LoadedModel`` field names, scheduler included) as ``pipeline_class`` (default:
    the family's pipeline) at ``path``: a family with a second tiny flavour of another pipeline
    (FLUX.2's ``tiny-klein``) names both."""
    from tune_models.family import LoadedModel

    if warm_start_steps > 0:
        model = LoadedModel(family=family, flavour=family.flavour(flavour), extras=dict(extras or {}), **components)
        warm_start(family, model, steps=warm_start_steps, seed=seed, shift=shift)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (pipeline_class or family.pipeline_class())(**components).save_pretrained(path)
    return path


def clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer built in memory: every byte is a token (with and without CLIP's ``</w>``
    word-end mark), no merges, CLIP's start/end tokens; ``<|endoftext|>`` pads, as in CLIP-L."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer():
    """A T5 tokenizer built in memory from a short unigram vocabulary (letters, digits, ``▁``)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def synthetic_images(count: int, size: int = 64, *, seed: int = 0) -> torch.Tensor:
    """Deterministic toy pictures in [-1, 1]: coloured rectangles on a tinted ground."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, size, size)
    for i in range(count):
        images[i] = (torch.rand(3, 1, 1, generator=generator) * 2 - 1) * 0.5
        for _ in range(2):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
            images[i, :, top : top + height, left : left + width] = colour
    return images


@torch.no_grad()
def calibrate_vae(vae: Any) -> None:
    """Set ``shift_factor``/``scaling_factor`` so toy images' latents have mean 0 and std 1 (how
    the real factors were chosen, on real images); a random VAE's raw latents are far narrower,
    and with the real factors every image would look alike to the denoiser."""
    latents = vae.encode(synthetic_images(16)).latent_dist.mode()
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


# ----------------------------------------------------------------------------- LoRA key layouts
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
"""diffusers/PEFT suffixes (under ``transformer.``)."""
LORA_DOWN, LORA_UP, LORA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
"""ComfyUI suffixes (under :data:`COMFYUI_PREFIX`)."""
COMFYUI_PREFIX = "diffusion_model."


def diffusers_lora_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``transformer.<module>.lora_A/B.weight`` keys -> ``{module: {"A": down, "B": up}}``; every
    module must have both weights."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("transformer.")
        for suffix, kind in ((LORA_A, "A"), (LORA_B, "B")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[kind] = tensor
                break
        else:
            raise ValueError(
                f"cannot convert LoRA key {key!r}: expected '<module>.lora_A.weight' or '<module>.lora_B.weight' "
                "(plain LoRA in diffusers/PEFT layout; biases, DoRA and alphas are not supported)"
            )
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
    return modules


def put_flat_lora(out: dict[str, torch.Tensor], prefix: str, name: str, tensor: torch.Tensor, alpha: float | None) -> bool:
    """Write a diffusers ``<module>.lora_A/B.weight`` tensor under its kohya/ComfyUI flat name,
    ``<prefix><module with _ for .>.lora_down/up.weight`` (and ``.alpha`` when given); False when
    ``name`` is not a LoRA down or up weight."""
    for suffix, native in ((LORA_A, LORA_DOWN), (LORA_B, LORA_UP)):
        if name.endswith(suffix):
            module = prefix + name[: -len(suffix)].replace(".", "_")
            out[f"{module}{native}"] = tensor
            if alpha is not None:
                out[f"{module}.alpha"] = torch.tensor(float(alpha))
            return True
    return False


def dotted_module_path(flat: str, compounds: Sequence[str]) -> str:
    """A kohya/ComfyUI flat module name back to its dotted path: ``_`` becomes ``.`` except
    inside the names in ``compounds`` (``self_attn``, ``to_out``, ...), which are kept whole.
    List longer compounds first when one starts another."""
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for compound in compounds:
            width = compound.count("_") + 1
            if "_".join(tokens[i : i + width]) == compound:
                parts.append(compound)
                i += width
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def comfyui_lora_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI-layout keys (``diffusion_model.<module>.lora_down/up.weight`` or ``lora_A/B``, and
    ``.alpha``) -> ``{module: (down, up)}`` with ComfyUI's ``alpha / rank`` scale folded into up."""
    suffixes = ((LORA_DOWN, "A"), (LORA_UP, "B"), (LORA_A, "A"), (LORA_B, "B"), (LORA_ALPHA, "alpha"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(COMFYUI_PREFIX)
        for suffix, kind in suffixes:
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[kind] = tensor
                break
        else:
            raise ValueError(
                f"cannot read ComfyUI LoRA key {key!r}: expected '<module>.lora_down.weight', "
                "'.lora_up.weight', '.lora_A.weight', '.lora_B.weight' or '.alpha'"
            )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"ComfyUI LoRA module {module!r} lacks its up or down weight")
        down, up = parts["A"], parts["B"]
        if "alpha" in parts:
            scale = float(parts["alpha"]) / down.shape[0]
            if scale != 1.0:
                up = (up.float() * scale).to(up.dtype)
        out[module] = (down, up)
    return out


def put_comfyui(
    out: dict[str, torch.Tensor], native: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None
) -> None:
    """Write one module in ComfyUI layout (with an ``.alpha`` entry when ``alpha`` is given)."""
    out[f"{COMFYUI_PREFIX}{native}{LORA_DOWN}"] = down
    out[f"{COMFYUI_PREFIX}{native}{LORA_UP}"] = up
    if alpha is not None:
        out[f"{COMFYUI_PREFIX}{native}{LORA_ALPHA}"] = torch.tensor(float(alpha))


def put_diffusers(out: dict[str, torch.Tensor], module: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """Write one module in diffusers layout (``transformer.<module>.lora_A/B.weight``)."""
    out[f"transformer.{module}{LORA_A}"] = down
    out[f"transformer.{module}{LORA_B}"] = up


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of an up weight's rows (diffusers' (scale, shift) vs (shift, scale))."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ----------------------------------------------------------------------------- fused LoRAs
def fuse_lora(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None], sizes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One LoRA for a linear whose output is the row-wise concatenation of several projections.

    ``parts[i]`` is ``(down, up)`` of projection ``i`` (output size ``sizes[i]``) or ``None`` when
    it has no LoRA. The fused down weight stacks the present downs; the fused up weight is block
    diagonal, with zero rows for absent projections, so ``up @ down`` is exactly the stacked
    deltas. Returns ``(down, up, n_present)``; with equal ranks the fused rank is ``n * r`` and an
    alpha must be multiplied by ``n`` to keep ``alpha / rank``.
    """
    present = [(i, pair) for i, pair in enumerate(parts) if pair is not None]
    if not present:
        raise ValueError("fuse_lora needs at least one part")
    ranks = {pair[0].shape[0] for _, pair in present}
    if len(ranks) != 1:
        raise ValueError(f"cannot fuse LoRA parts of different ranks {sorted(ranks)}")
    (rank,) = ranks
    ref = present[0][1][1]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    up = torch.zeros(sum(sizes), rank * len(present), dtype=ref.dtype, device=ref.device)
    for column, (i, (_, part_up)) in enumerate(present):
        if part_up.shape[0] != sizes[i]:
            raise ValueError(f"LoRA part {i} has {part_up.shape[0]} output rows, expected {sizes[i]}")
        up[offsets[i] : offsets[i] + sizes[i], column * rank : (column + 1) * rank] = part_up
    down = torch.cat([pair[0] for _, pair in present], dim=0)
    return down, up, len(present)


def put_fused_comfyui(
    out: dict[str, torch.Tensor],
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]],
    order: Sequence[str],
    fused: str,
    unfused: str,
    alpha: float | None,
) -> None:
    """Put ``projections`` (``name -> (down, up)``) in ComfyUI layout: fused into module ``fused``
    (rows in ``order``, alpha times the count) when every projection of ``order`` has a LoRA and
    all share one rank, since only then the fused LoRA is exact; otherwise each as
    ``<unfused>.<name>`` with its diffusers name."""
    ranks = {down.shape[0] for down, _ in projections.values()}
    if set(projections) != set(order) or len(ranks) != 1:
        for proj, (down, up) in projections.items():
            put_comfyui(out, f"{unfused}.{proj}", down, up, alpha)
        return
    parts = [projections[p] for p in order]
    down, up, count = fuse_lora(parts, [u.shape[0] for _, u in parts])
    put_comfyui(out, fused, down, up, None if alpha is None else count * alpha)


def fuse_present_lora(
    present: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: Sequence[tuple[str, int]]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`fuse_lora` for the projections ``spec`` (``(name, output size / input width)`` in row
    order) of which ``present`` holds the ``(down, up)`` pairs that have a LoRA; absent ones get
    their size from the ratio."""
    width = next(iter(present.values()))[0].shape[1]  # input features of the fused linear
    parts = [present.get(name) for name, _ in spec]
    sizes = [present[name][1].shape[0] if name in present else ratio * width for name, ratio in spec]
    return fuse_lora(parts, sizes)


def split_fused_lora(
    down: torch.Tensor, up: torch.Tensor, sizes: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Inverse of :func:`fuse_lora`: exact ``(down, up)`` per projection, ``None`` where a
    projection's rows are all zero (it had no LoRA).

    A block-diagonal up weight (each projection's rows use their own contiguous columns) splits
    into the original low-rank pairs (a projection whose rows stayed zero gets its slot back when
    the rank has room for all of them). A dense one (trained fused elsewhere) splits exactly as
    ``(whole down, that projection's rows of up)``, as diffusers' own converters do.
    """
    if up.shape[0] != sum(sizes):
        raise ValueError(f"fused LoRA up weight has {up.shape[0]} rows, expected {sum(sizes)} ({list(sizes)})")
    blocks = list(up.split(list(sizes), dim=0))
    parts, fused_rank = len(sizes), down.shape[0]
    used = [torch.nonzero(block.abs().sum(dim=0)).flatten().tolist() for block in blocks]

    def slice_at(i: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return down[lo:hi].contiguous(), blocks[i][:, lo:hi].contiguous()

    if not any(used):  # an all-zero LoRA (e.g. untrained): equal slots when possible
        if fused_rank % parts == 0:
            r = fused_rank // parts
            return [slice_at(i, i * r, (i + 1) * r) for i in range(parts)]
        return [(down.clone(), block.contiguous()) for block in blocks]
    spans = sorted((cols[0], cols[-1] + 1, i) for i, cols in enumerate(used) if cols)
    solid = all(len(used[i]) == hi - lo for lo, hi, i in spans)
    disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * parts
    widths = {hi - lo for lo, hi, _ in spans}
    if solid and disjoint and len(widths) == 1:
        (r,) = widths
        if fused_rank % r == 0 and all(lo % r == 0 for lo, _, _ in spans):
            slot = {i: lo // r for lo, _, i in spans}
            # A projection whose up weight stayed zero (e.g. a query nobody reads) still owns a
            # slot when the fused rank has room for every projection: give it back, in order.
            zero = [i for i in range(parts) if not used[i]]
            free = sorted(set(range(fused_rank // r)) - set(slot.values()))
            if zero and len(zero) == len(free):
                candidate = {**slot, **dict(zip(zero, free))}
                if [candidate[i] for i in range(parts)] == sorted(candidate.values()):
                    slot = candidate
            for i, s_ in slot.items():
                out[i] = slice_at(i, s_ * r, (s_ + 1) * r)
            return out
    if solid and disjoint and spans[0][0] == 0 and spans[-1][1] == fused_rank and all(
        a[1] == b[0] for a, b in zip(spans, spans[1:])
    ):
        for lo, hi, i in spans:
            out[i] = slice_at(i, lo, hi)
        return out
    for i, cols in enumerate(used):  # dense: each projection keeps the whole down (exact)
        if cols:
            out[i] = (down.clone(), blocks[i].contiguous())
    return out


def noised(
    family: Any, model: Any, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy latents, training target)`` in ``family``'s noise scheme, for tiny-model warm
    starts and the conformance suite: flow (``times`` are sigmas), or DDPM (``times`` are integer
    timesteps; ``model.scheduler.alphas_cumprod`` and the model's prediction type)."""
    if family.prediction == "flow":
        view = times.view(-1, 1, 1, 1).to(latents)
        return (1 - view) * latents + view * noise, noise - latents
    alpha = model.scheduler.alphas_cumprod[times.long().cpu()].view(-1, 1, 1, 1).to(latents)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    if family.prediction_type(model) == "v_prediction":
        return noisy, alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    return noisy, noise


def warm_start(
    family: Any,
    model: Any,
    *,
    steps: int,
    seed: int,
    shift: float = 1.0,
    lr: float = 5e-3,
    size: int = 64,
    pool: int = 32,
    batch: int = 2,
) -> None:
    """Train a tiny model's transformer (all weights) briefly as a denoiser of synthetic images,
    so that a LoRA on it has something to adapt (a random transformer cannot denoise at all).
    ``pool`` images of ``size`` px, ``batch`` of them a step (a slow VAE wants fewer, smaller ones)."""
    generator = torch.Generator().manual_seed(seed)
    words = ["a", "red", "blue", "green", "square", "circle", "photo", "of", "big", "small", "on", "grey"]
    latents = family.encode_images(model, synthetic_images(pool, size=size, seed=seed + 1))
    captions = [
        " ".join(words[j] for j in torch.randint(0, len(words), (4,), generator=generator).tolist())
        for _ in range(pool)
    ]
    embeds = family.encode_prompts(model, captions)
    transformer = model.transformer
    transformer.requires_grad_(True)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            index = torch.randint(0, pool, (batch,), generator=generator)
            x0 = latents[index]
            noise = torch.randn(x0.shape, generator=generator)
            if family.prediction == "flow":
                times = family.shift_sigmas(torch.rand(batch, generator=generator), shift)
            else:  # DDPM: integer timesteps of the scheduler's training schedule
                times = torch.randint(0, int(model.scheduler.config.num_train_timesteps), (batch,), generator=generator)
            noisy, target = noised(family, model, x0, noise, times)
            cond = family.collate_prompts([embeds[i] for i in index.tolist()], "cpu", torch.float32)
            pred = family.predict(model, noisy, times, cond)
            torch.nn.functional.mse_loss(pred, target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    transformer.requires_grad_(False)
    transformer.eval()
