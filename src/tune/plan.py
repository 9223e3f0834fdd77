"""What a run would do, resolved from a loaded config without loading any weights (``tune check``).

The point of a plan is to catch mistakes in seconds instead of after a 20-minute model download:
an unknown family or optimizer, a dataset folder with no usable images, a step count that is not
what the user expected. So :func:`build_plan` resolves names through the plugin registries, runs
dataset discovery (it reads image headers only) and bucket planning, and computes the schedule,
but never imports torch or diffusers: family facts come from what the family registered
(``info``), not from importing the family module.

Problems a user can fix are collected in ``plan["problems"]`` rather than raised, so one run of
``tune check`` reports all of them; the caller decides whether any is fatal.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from tune.config import LoadedConfig

_NOT_KNOWN = "the flavour's default checkpoint"


def _registry_check(registry_path: str, attr: str, name: str, problems: list[str], key: str) -> Any:
    """``registry.get(name)``, recording the registry's own message (it lists the names) on failure."""
    import importlib

    from tune_data.plugins import PluginError

    try:
        registry = getattr(importlib.import_module(registry_path), attr)
        return registry.get(name)
    except PluginError as exc:
        problems.append(f"{key}: {exc}")
    except ImportError as exc:  # a sibling package not installed: say so instead of crashing
        problems.append(f"{key}: cannot check {name!r} ({exc})")
    return None


def _flavours(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flavour facts from a family's registration.

    ``flavours`` may be a list of names or ``{name: facts}``; ``flavour_defaults`` (``{name: facts}``)
    adds facts to a list of names. Facts use :class:`tune_models.family.Flavour`'s field names
    (``pretrained``, ``inference_steps``, ``guidance``, ``shift``, ``assistant_lora``, ...).
    """
    flavours = info.get("flavours") or {}
    if isinstance(flavours, dict):
        out = {str(k): dict(v) if isinstance(v, dict) else {} for k, v in flavours.items()}
    else:
        out = {str(name): {} for name in flavours}
    for name, facts in (info.get("flavour_defaults") or {}).items():
        out.setdefault(str(name), {}).update(facts)
    return out


def _family_section(loaded: LoadedConfig, problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    train = loaded.train
    entry = _registry_check("tune_models.registry", "model_families", train.model_family, problems, "model_family")
    family: dict[str, Any] = {"requested": train.model_family, "name": None, "plugin": None}
    flavour: dict[str, Any] = {"name": train.model_flavour, "default_applied": False, "choices": []}
    facts: dict[str, Any] = {}
    if entry is None:
        return {"family": family, "flavour": flavour}, facts
    info = dict(entry.info)
    family.update(name=entry.name, plugin=entry.plugin, description=info.get("description"))
    flavours = _flavours(info)
    flavour["choices"] = sorted(flavours)
    name = train.model_flavour
    if name is None:
        name = info.get("default_flavour") or (next(iter(flavours)) if flavours else None)
        flavour["default_applied"] = True
    if flavour["default_applied"] and name is not None:
        from tune_models.flavour_facts import default_flavour_note

        note = default_flavour_note(
            entry.name, name, info.get("simpletuner_default_flavour"), info.get("flavour_aliases"),
            info.get("unavailable_flavours"),
        )
        if note:
            flavour["note"] = note
    if flavours and name is not None:
        from tune_models.flavour_facts import resolve_flavour_name

        try:
            canonical = resolve_flavour_name(
                entry.name, name, flavours, info.get("flavour_aliases"), info.get("unavailable_flavours")
            )
        except ValueError as exc:
            problems.append(f"model_flavour: {exc}")
        else:
            if canonical != name:  # SimpleTuner's name for it
                flavour["written"] = name
            name = canonical
    flavour["name"] = name
    facts = flavours.get(name or "", {})
    family["lora_targets"] = sorted(info.get("lora_targets") or info.get("lora_target_presets") or [])
    family["default_lora_target"] = info.get("default_lora_target")
    family["prediction"] = info.get("prediction", "flow")  # the family's declared noise scheme
    family["text_encoder_loras"] = list(info.get("text_encoder_loras") or [])  # train_text_encoder
    return {"family": family, "flavour": flavour}, facts


def _components(loaded: LoadedConfig, facts: dict[str, Any]) -> dict[str, Any]:
    from tune_models.sources import base_checkpoint

    train = loaded.train
    base = train.pretrained_model_name_or_path
    # A single file there is the transformer; the other components come from the flavour's repository.
    single_file = base_checkpoint(base, facts["pretrained"]).transformer_file if facts.get("pretrained") else None
    if single_file:
        base_text = facts["pretrained"]
        base_label = f"{base_text} [flavour default; pretrained_model_name_or_path is a single transformer file]"
    elif base:
        base_text, base_label = base, f"{base} [config]"
    elif facts.get("pretrained"):
        base_text = facts["pretrained"]
        base_label = f"{base_text} [flavour default]"
    else:
        base_text = base_label = _NOT_KNOWN
    subfolder = train.pretrained_transformer_subfolder
    subfolder_text = "(root)" if subfolder == "none" else subfolder or "transformer"
    transformer = train.pretrained_transformer_model_name_or_path or base_text
    if train.disable_assistant_lora:
        assistant = "disabled (disable_assistant_lora)"
    elif train.assistant_lora_path:
        assistant = train.assistant_lora_path
        weight = train.assistant_lora_weight_name or facts.get("assistant_lora_weight_name")
        assistant += f" ({weight})" if weight else ""
    elif facts.get("assistant_lora"):
        assistant = f"{facts['assistant_lora']}"
        if facts.get("assistant_lora_weight_name"):
            assistant += f" ({facts['assistant_lora_weight_name']})"
        assistant += " [flavour default]"
    elif facts:
        assistant = "none"
    else:
        assistant = "the flavour's, if it has one"
    return {
        "base": base_label,
        "transformer": f"{single_file} [single file]" if single_file else f"{transformer} / {subfolder_text}",
        "vae": train.pretrained_vae_model_name_or_path or f"{base_text} / vae",
        "revision": train.revision or "default branch",
        "variant": train.variant or "default weights",
        "assistant_lora": assistant,
    }


def _about(dataset_id: str, exc: Exception) -> str:
    """tune-data's messages already start with the dataset; do not say it twice."""
    text = str(exc)
    prefix = f"dataset {dataset_id!r}"
    return text if text.startswith(prefix) else f"{prefix}: {text}"


def _dataset_section(loaded: LoadedConfig, problems: list[str]) -> list[dict[str, Any]]:
    """Discover every image dataset and plan its buckets (image headers only, no caches written)."""
    from tune_data.buckets import plan_buckets
    from tune_data.discovery import discover
    from tune_data.sampler import BucketBatchSampler
    from tune_data.storage import open_storage

    from tune_data.conditioning import discover_conditioning, pair_conditioning
    from tune_data.config import conditioning_for

    batch = loaded.train.train_batch_size
    rows = []
    indexes: dict[str, Any] = {}  # conditioning dataset id -> its discovery, made once

    def conditioning_index(dataset):
        if dataset.id not in indexes:
            indexes[dataset.id] = discover_conditioning(dataset, open_storage(dataset), metadata_dir=None)
        return indexes[dataset.id]

    for dataset in loaded.datasets:
        row: dict[str, Any] = {"id": dataset.id, "type": dataset.type, "dataset_type": dataset.dataset_type}
        rows.append(row)
        if dataset.dataset_type == "conditioning":
            row.update(path=dataset.instance_data_dir, conditioning_type=dataset.conditioning_type)
            try:
                report = conditioning_index(dataset).report
            except (ValueError, OSError, NotImplementedError) as exc:
                row["error"] = str(exc)
                problems.append(_about(dataset.id, exc))
                continue
            row.update(seen=report.seen, kept=len(report.kept), dropped=len(report.dropped),
                       dropped_reasons=dict(sorted(Counter(d.reason for d in report.dropped).items())))
            continue
        if not dataset.is_image:
            row["path"] = dataset.cache_dir or f"default, under cache_dir {loaded.train.cache_dir!r}"
            row["default"] = dataset.default
            continue
        row.update(path=dataset.instance_data_dir, repeats=dataset.repeats, probability=dataset.probability)
        if dataset.held_out or dataset.id == loaded.train.eval_dataset_id:
            row["held_out"] = True  # scored for eval_loss, never trained on (no steps of its own)
        row["resolution"] = f"{dataset.resolution:g} ({dataset.resolution_type})"
        try:
            dataset.require_implemented()
            report = discover(dataset, open_storage(dataset), metadata_dir=None)
            if dataset.conditioning_data:
                # Images without a pair in every conditioning dataset are dropped, as in training.
                partners = conditioning_for(dataset, loaded.datasets)
                row["conditioning_data"] = [c.id for c in partners if c.conditioning_type != "mask"]
                row["loss_mask"] = [c.id for c in partners if c.conditioning_type == "mask"]
                report, _ = pair_conditioning(report, [conditioning_index(c) for c in partners])
        except (ValueError, OSError, NotImplementedError) as exc:
            row["error"] = str(exc)
            problems.append(_about(dataset.id, exc))
            continue
        row.update(
            seen=report.seen,
            kept=len(report.kept),
            dropped=len(report.dropped),
            dropped_reasons=dict(sorted(Counter(d.reason for d in report.dropped).items())),
        )
        try:
            buckets = plan_buckets(list(report.kept), dataset)
        except ValueError as exc:
            row["error"] = str(exc)
            problems.append(_about(dataset.id, exc))
            continue
        row["buckets"] = {f"{w}x{h}": len(items) for (w, h), items in sorted(buckets.items())}
        # The sampler's own count: one bucket per batch, each bucket's incomplete tail dropped.
        try:
            sampler = BucketBatchSampler(
                buckets, batch, repeats=dataset.repeats, dataset_id=dataset.id,
                oversubscribe=dataset.allow_dataset_oversubscription,
            )
            row["batches_per_epoch"] = sampler.batches_per_epoch()
            if sampler.oversubscribed_from is not None:  # allow_dataset_oversubscription raised it
                row["repeats"] = sampler.repeats
        except ValueError as exc:  # DatasetTooSmallError says which buckets and what to change
            row["batches_per_epoch"] = 0
            problems.append(_about(dataset.id, exc))
    return rows


def _steps(loaded: LoadedConfig, datasets: list[dict[str, Any]]) -> dict[str, Any]:
    train = loaded.train
    accumulation = train.gradient_accumulation_steps
    steps: dict[str, Any] = {
        "train_batch_size": train.train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "effective_batch": train.train_batch_size * accumulation,
    }
    images = [row for row in datasets if row["dataset_type"] == "image" and not row.get("held_out")]
    batches = None
    if images and all("batches_per_epoch" in row for row in images):
        batches = sum(row["batches_per_epoch"] for row in images)
        steps["batches_per_epoch"] = batches
        steps["steps_per_epoch"] = math.ceil(batches / accumulation)
    if train.max_train_steps is not None:
        steps["total"] = train.max_train_steps
        steps["from"] = "max_train_steps"
        if batches:
            steps["epochs"] = round(train.max_train_steps / steps["steps_per_epoch"], 2)
    elif batches is not None:
        steps["total"] = train.total_steps(batches)
        steps["from"] = f"num_train_epochs={train.num_train_epochs} x {steps['steps_per_epoch']} steps per epoch"
    else:
        steps["total"] = None
        steps["from"] = f"num_train_epochs={train.num_train_epochs} (steps unknown: datasets could not be read)"
    steps["note"] = "one process; with N GPUs each step sees N batches"
    return steps


def build_plan(loaded: LoadedConfig) -> dict[str, Any]:
    """The resolved run as plain data (JSON-serialisable); ``problems`` lists what must be fixed."""
    train = loaded.train
    problems: list[str] = []
    plan: dict[str, Any] = {"config": str(loaded.config_path) if loaded.config_path else None}
    family, facts = _family_section(loaded, problems)
    plan.update(family)
    plan["components"] = _components(loaded, facts)
    plan["datasets"] = _dataset_section(loaded, problems)
    if not loaded.datasets:
        problems.append("no datasets: set data_backend_config to a multidatabackend.json")
    plan["steps"] = _steps(loaded, plan["datasets"])

    _registry_check("tune_train.registry", "optimizers", train.optimizer, problems, "optimizer")
    _registry_check("tune_train.registry", "lr_schedulers", train.lr_scheduler, problems, "lr_scheduler")
    plan["optimization"] = {
        "optimizer": train.optimizer,
        "learning_rate": train.learning_rate,
        "lr_scheduler": train.lr_scheduler,
        "lr_warmup_steps": train.lr_warmup_steps,
        "max_grad_norm": train.max_grad_norm or "off",
        "seed": train.seed,
    }

    if train.base_model_precision != "no_change":
        found = _registry_check("tune_quant.registry", "quantisers", train.base_model_precision, problems, "base_model_precision")
        if found is not None and train.quantize_via == "pipeline":
            from tune_quant.pipeline import no_pipeline_form

            problem = no_pipeline_form(train.base_model_precision)
            if problem:
                problems.append(problem)
    for index, preset in enumerate(train.text_encoder_precisions(), start=1):
        if preset != "no_change":
            _registry_check("tune_quant.registry", "quantisers", preset, problems, f"text_encoder_{index}_precision")
    if train.musubi_blocks_to_swap:
        offload = (f"block swap: the last {train.musubi_blocks_to_swap} transformer blocks stream from "
                   f"{train.musubi_block_swap_device}")
    elif train.ramtorch:
        offload = (f"ramtorch: {train.ramtorch_transformer_percent:g}% of the frozen linears"
                   f"{' matching ' + train.ramtorch_target_modules if train.ramtorch_target_modules else ''} "
                   "stay in CPU memory and stream in per use")
    elif train.enable_group_offload:
        offload = f"group offload ({train.group_offload_type}, {train.group_offload_blocks_per_group} block(s)/group"
        offload += ", CUDA stream" if train.group_offload_use_stream else ""
        offload += f", to disk at {train.group_offload_to_disk_path}" if train.group_offload_to_disk_path else ""
        offload += ")"
        also = [name for name, on in (("text encoders", train.group_offload_text_encoder),
                                      ("VAE", train.group_offload_vae)) if on]
        offload += f"; the {' and the '.join(also)} too" if also else ""
    else:
        offload = "model CPU offload" if train.enable_model_cpu_offload else "none"
    if train.offload_checkpointed_activations:
        offload += "; checkpointed activations wait in CPU memory"
    if train.enable_chunked_feed_forward:
        from tune_offload.ffn_chunking import DEFAULT_CHUNK_SIZE

        offload += f"; MLPs run over checkpointed {train.feed_forward_chunk_size or DEFAULT_CHUNK_SIZE}-token slices"
    plan["precision"] = {
        "mixed_precision": train.mixed_precision,
        "base_model_precision": train.base_model_precision,
        "text_encoder_precision": ", ".join(
            f"{i}: {p}" for i, p in enumerate(train.text_encoder_precisions(), start=1) if p != "no_change"
        ) or "no_change",
        "base_model_default_dtype": train.base_model_default_dtype,
        "quantize_via": train.quantize_via,
        "gradient_checkpointing": train.gradient_checkpointing,
        "offload": offload,
    }

    if train.peft_lora_target_modules:
        target = "modules " + ", ".join(train.peft_lora_target_modules)
    elif train.lora_target:
        target = train.lora_target
        known = plan["family"].get("lora_targets")
        if known and target not in known:
            problems.append(f"lora_target: unknown preset {target!r}; choose one of: {', '.join(known)}")
    else:
        default = plan["family"].get("default_lora_target")
        target = f"family default ({default})" if default else "family default"
    plan["lora"] = {
        "type": train.lora_type,
        "rank": train.lora_rank,
        "alpha": train.lora_scale_alpha(),
        "scale": train.lora_scale(),
        "dropout": train.lora_dropout,
        "target": target,
        "format": train.lora_format,
        "init_lora": train.init_lora,
    }
    if train.train_text_encoder:
        plan["lora"]["text_encoders"] = _text_encoder_plan(train, plan["family"], problems)
    if train.flow_schedule_auto_shift:
        shift = "auto (by image size)"
    elif train.flow_schedule_shift is not None:
        shift = train.flow_schedule_shift
    elif "shift" in facts:
        shift = "auto (by image size)" if facts["shift"] is None else f"{facts['shift']} [flavour default]"
    else:
        shift = "flavour default"
    plan["noise"] = {"flow_shift": shift, "caption_dropout_probability": train.caption_dropout_probability}
    prediction = plan["family"].get("prediction", "flow")
    if prediction != "flow":  # DDPM families: no flow shift; their own keys instead
        plan["noise"] = {
            "prediction_type": train.prediction_type or f"{prediction} [checkpoint's scheduler, unless it says otherwise]",
            "snr_gamma": train.snr_gamma,
            "soft_min_snr": train.use_soft_min_snr,
            "timesteps": _ddpm_timesteps(train),
            "caption_dropout_probability": train.caption_dropout_probability,
        }
        if train.timestep_bias_strategy != "none":
            plan["noise"]["timestep_bias"] = _timestep_bias(train)
        if train.diff2flow_enabled and train.diff2flow_loss:
            plan["noise"]["loss"] = "flow velocity noise - x0 (diff2flow_loss; snr_gamma ignored)"
    else:
        if train.snr_gamma:
            plan["noise"]["snr_gamma"] = f"{train.snr_gamma:g} ignored (flow matching)"
        if train.timestep_bias_strategy != "none":
            plan["noise"]["timestep_bias"] = f"{train.timestep_bias_strategy} ignored (flow matching)"
    if train.tread_config:  # already validated by TrainConfig
        plan["noise"]["tread"] = "; ".join(
            f"{route['selection_ratio']:.0%} of image tokens skip blocks {route['start_layer_idx']}..{route['end_layer_idx']}"
            for route in train.tread_config["routes"]
        ) + " (training forwards only)"
    plan["validation"] = _validation(loaded, facts)
    plan["output_dir"] = train.output_dir
    plan["checkpoints"] = {
        "every": train.checkpoint_step_interval or "end only",
        "keep": train.checkpoints_total_limit or "all",
        "resume": train.resume_from_checkpoint or "no",
    }
    plan["ignored"] = list(loaded.ignored)
    plan["warnings"] = list(loaded.warnings) + _flow_snr_gamma_warning(train, prediction) + _flow_timestep_bias_warning(train, prediction)
    plan["problems"] = problems
    return plan


def _text_encoder_plan(train: Any, family: dict[str, Any], problems: list[str]) -> str:
    """``train_text_encoder``: the encoders that get a LoRA and their rate, or a problem naming
    the families that can (read from the registrations, without importing the families)."""
    components = family.get("text_encoder_loras") or []
    if family.get("name") and not components:
        from tune_models.registry import model_families

        able = sorted(entry.name for entry in model_families if entry.info.get("text_encoder_loras"))
        problems.append(
            f"train_text_encoder: model_family {family['name']!r} cannot train its text encoder; "
            f"families that can: {', '.join(able) or 'none'}"
        )
        return "refused"
    rate = train.text_encoder_lr if train.text_encoder_lr is not None else f"{train.learning_rate:g} (learning_rate)"
    return f"{', '.join(components)} at lr {rate}; encoded live each step (no text cache for them)"


def _validation(loaded: LoadedConfig, facts: dict[str, Any]) -> dict[str, Any] | str:
    train = loaded.train
    if train.validation_disable:
        return "disabled"
    flavour_default = "flavour default"
    return {
        "every": train.validation_step_interval or "end only",
        "on_startup": train.validation_on_startup,
        "sizes": [f"{w}x{h}" for w, h in train.validation_sizes(default=facts.get("resolution"))],
        "steps": train.validation_num_inference_steps or facts.get("inference_steps") or flavour_default,
        "guidance": train.validation_guidance if train.validation_guidance is not None else facts.get("guidance", flavour_default),
        "prompt": train.validation_prompt,
        "prompt_library": train.user_prompt_library,
    }


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{key}:")
                out.extend(_lines(item, indent + 2))
            else:
                out.append(f"{pad}{key}: {_scalar(item)}")
        return out
    if isinstance(value, list):
        return [f"{pad}- {_scalar(item)}" for item in value]
    return [f"{pad}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return "none" if not value else str(value)
    return str(value)


def _flow_snr_gamma_warning(train: Any, prediction: str) -> list[str]:
    """Min-SNR weights are defined on a DDPM schedule; a flow family weights its timesteps through
    the sigma sampling and shift instead (docs/training.md says why snr_gamma stays off there)."""
    if prediction != "flow" or not train.snr_gamma:
        return []
    return [
        f"snr_gamma {train.snr_gamma:g} has no effect: model_family {train.model_family!r} trains with flow "
        "matching; weight timesteps with the flow sampling keys instead (flow_sigmoid_scale, "
        "flow_use_beta_schedule, flow_use_uniform_schedule, flow_schedule_shift)"
    ]


def _flow_timestep_bias_warning(train: Any, prediction: str) -> list[str]:
    """The ``timestep_bias_*`` keys weight a DDPM schedule's integer timesteps; flow families draw
    sigmas with their own keys."""
    if prediction != "flow" or train.timestep_bias_strategy == "none":
        return []
    return [
        f"timestep_bias_strategy {train.timestep_bias_strategy!r} has no effect: model_family "
        f"{train.model_family!r} trains with flow matching; weight timesteps with the flow sampling keys "
        "instead (flow_sigmoid_scale, flow_use_beta_schedule, flow_use_uniform_schedule, flow_schedule_shift)"
    ]


def _timestep_bias(train: Any) -> str:
    """What the ``timestep_bias_*`` keys do to a DDPM run's timestep draws."""
    strategy, multiplier = train.timestep_bias_strategy, train.timestep_bias_multiplier
    if strategy == "range":
        where = f"timesteps {train.timestep_bias_begin}..{train.timestep_bias_end - 1}"
    else:
        side = "last" if strategy == "later" else "first"
        where = f"the {side} {train.timestep_bias_portion:g} of the timesteps"
    effect = "never drawn" if multiplier == 0 else f"drawn with weight {multiplier:g} (others 1)"
    return f"{strategy}: {where} {effect}"


def _dataset_lines(row: dict[str, Any]) -> list[str]:
    head = f"  {row['id']} [{row['type']}, {row['dataset_type']}]"
    if row["dataset_type"] == "conditioning":
        kind = row.get("conditioning_type")
        if kind == "mask":  # not a model input: say what it does
            kind = "mask: weights the loss, white = train, black = ignore"
        out = [f"{head} {row.get('path')} ({kind})"]
        if "error" in row:
            return out + [f"    ERROR: {row['error']}"]
        files = f"    files: {row['seen']} seen, {row['kept']} kept, {row['dropped']} dropped"
        if row["dropped_reasons"]:
            files += " (" + ", ".join(f"{n} {reason}" for reason, n in row["dropped_reasons"].items()) + ")"
        return out + [files]
    if row["dataset_type"] != "image":
        return [f"{head} cache: {_scalar(row.get('path'))}{' (default)' if row.get('default') else ''}"]
    out = [f"{head} {row.get('path')}", f"    resolution {row['resolution']}, repeats {row['repeats']}"]
    if row.get("held_out"):
        out.append("    held out: measured for eval_loss, never trained on")
    if row.get("conditioning_data"):
        out.append(f"    paired with conditioning: {', '.join(row['conditioning_data'])}")
    if row.get("loss_mask"):
        out.append(f"    loss mask from: {', '.join(row['loss_mask'])} (masked loss)")
    if "error" in row:
        return out + [f"    ERROR: {row['error']}"]
    files = f"    files: {row['seen']} seen, {row['kept']} kept, {row['dropped']} dropped"
    if row["dropped_reasons"]:
        files += " (" + ", ".join(f"{n} {reason}" for reason, n in row["dropped_reasons"].items()) + ")"
    out.append(files)
    if row.get("buckets"):
        out.append("    buckets: " + ", ".join(f"{size}: {n}" for size, n in row["buckets"].items()))
    out.append(f"    batches per epoch: {row['batches_per_epoch']}")
    return out


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text for a terminal: one section per concern, problems last."""
    family = plan["family"]
    flavour = plan["flavour"]
    name = family["name"] or f"{family['requested']} (not registered)"
    flavour_text = f"{flavour['name']}{' (default)' if flavour['default_applied'] else ''}"
    if flavour.get("written"):
        flavour_text += f" (written as {flavour['written']!r})"
    if flavour.get("note"):
        flavour_text += f"\n  note: {flavour['note']}"
    out = [f"config: {plan['config'] or '(from a dict)'}", f"family: {name}", f"flavour: {flavour_text}"]
    for title in ("components", "precision", "lora", "noise", "optimization", "steps", "checkpoints"):
        out.append(f"{title}:")
        out.extend(_lines(plan[title], 2))
    out.append("validation:" if isinstance(plan["validation"], dict) else f"validation: {plan['validation']}")
    if isinstance(plan["validation"], dict):
        out.extend(_lines(plan["validation"], 2))
    out.append(f"datasets ({len(plan['datasets'])}):")
    for row in plan["datasets"]:
        out.extend(_dataset_lines(row))
    out.append(f"output_dir: {plan['output_dir']}")
    if plan["ignored"]:
        out.append(f"ignored SimpleTuner options ({len(plan['ignored'])}): {', '.join(plan['ignored'])}")
    for message in plan["warnings"]:
        if not message.startswith("accepted but ignored"):
            out.append(f"warning: {message}")
    if plan["problems"]:
        out.append(f"problems ({len(plan['problems'])}):")
        out.extend(f"  - {problem}" for problem in plan["problems"])
    else:
        out.append("no problems found")
    return "\n".join(out)


def _ddpm_timesteps(train: Any) -> str:
    """Which share of a DDPM schedule the run trains (``refiner_training`` and its inverse)."""
    if not train.refiner_training:
        return "all"
    if train.refiner_training_invert_schedule:
        return f"all but the lowest {train.refiner_training_strength:g} (refiner_training_invert_schedule)"
    return f"lowest {train.refiner_training_strength:g} (refiner_training)"
