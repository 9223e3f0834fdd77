"""The training loop, readable top to bottom: ``setup``, ``train_step``, ``train``, ``save_checkpoint``.

Exact resume is built in rather than bolted on: every random draw of a step (sigmas, noise, caption
dropout, LoRA dropout) comes from a generator seeded by ``(seed, step, micro-step)``, and the data
order comes from the sampler's saved position. A run resumed from ``checkpoint-N`` therefore
produces the same loss at step N+1 as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from tune_data.config import DatasetConfig
from tune_train import checkpoint as ckpt
from tune_train import ddpm, evaluation, flow
from tune_train.artifacts import TrainedAdapter
from tune_train.config import ConfigError, TrainConfig
from tune_train.data import TrainingData, check_reference_support, reference_kwargs
from tune_train.loss_log import LossLog
from tune_train.ema import EMA
from tune_train.registry import lr_schedulers, optimizers

log = logging.getLogger(__name__)

LOSS_LOG = "loss_log.csv"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


def _plugin_hook():
    """The lifecycle hooks of tune-train (``tune_step_end`` etc.), with every plugin loaded."""
    from tune_data.plugins import add_hookspecs, load_entry_points, plugin_manager, register_builtin
    from tune_train import hookspecs

    add_hookspecs(hookspecs)
    register_builtin("tune_train", "tune_train.builtins")
    load_entry_points()
    return plugin_manager().hook


def step_generator(seed: int, step: int, micro_step: int = 0) -> torch.Generator:
    """A CPU generator that depends only on the seed and the position in training."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 101 + micro_step) % (2**63 - 1))


class DiskLowError(RuntimeError):
    """Free space in ``output_dir`` fell below ``disk_low_threshold`` with ``disk_low_action`` stop."""


def nonfinite_groups(named_tensors: Sequence[tuple[str, torch.Tensor | None]]) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (one device sync for all of them)."""
    present = [(name, t) for name, t in named_tensors if t is not None]
    if not present:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in present])
    if len({n.device for n in norms}) == 1:
        finite = torch.isfinite(torch.stack(norms)).cpu()
    else:  # parameters spread over devices: one small transfer each
        finite = torch.stack([torch.isfinite(n).cpu() for n in norms])
    bad = (~finite).nonzero().flatten().tolist()
    return [present[i][0] for i in bad]


def _trackers(report_to: str) -> list[str]:
    from tune_train.trackers import tracker_names

    return tracker_names(report_to)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


@attrs.define
class TrainResult:
    """What a finished run produced, by name, and its final numbers."""

    outputs: dict[str, str]
    global_step: int
    losses: list[float]


class Trainer:
    """One LoRA training run of a model family on a set of datasets."""

    def __init__(
        self, config: TrainConfig, datasets: Sequence[DatasetConfig], *, progress: bool = True
    ) -> None:
        self.config = config
        self.datasets = list(datasets)
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.global_step = 0
        self.losses: list[float] = []
        self.validation_images: dict[int, list[tuple[str, str]]] = {}
        self.eval_losses: dict[int, float] = {}
        """``eval_loss`` by step (``eval_dataset_id``); also in ``eval_log.csv``."""
        self.clip_scores: dict[int, float] = {}
        """Mean ``clip_score`` of the validation images by step (``evaluation_type: clip``)."""
        self._clip: evaluation.ClipScorer | None = None
        self._is_setup = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load the model, prepare data and caches, build the optimizer, and resume if asked."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from tune_models.family import ModelSource, get_family
        from tune_train.adapter_setup import build_trained_weights

        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_partials(self.output_dir)

        # Resolve the resume point first: a wrong path should fail before minutes of loading.
        self.resume_path = None
        if config.resume_from_checkpoint:
            self.resume_path = ckpt.resolve_resume_path(self.output_dir, config.resume_from_checkpoint)

        trackers = _trackers(config.report_to)
        from tune_train.trackers import check_installed, init_kwargs

        check_installed(config.report_to)  # a missing tracker library fails before the model loads
        mixed = config.mixed_precision if config.mixed_precision in ("bf16", "fp16") else "no"
        # accelerate keeps one process-wide state; a second run in the same process (a notebook,
        # a test suite) with another precision must start from a clean one. The distributed
        # environment (PartialState) is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=mixed,
            cpu=not torch.cuda.is_available(),
            log_with=trackers or None,
            project_dir=str(self.output_dir / config.logging_dir),
        )
        set_seed(config.seed)
        self.hook = _plugin_hook()

        # Model: frozen base weights in the storage dtype; the LoRA trains in fp32.
        self.family = get_family(config.model_family)
        self.flavour = self.family.flavour(config.model_flavour)
        if config.pretrained_gemma_model_name_or_path and self.family.text_encoder_config_key != "pretrained_gemma_model_name_or_path":
            raise ConfigError(
                f"pretrained_gemma_model_name_or_path is set, but model_family {self.family.name!r} has no Gemma text encoder"
            )
        source = ModelSource(
            pretrained_model_name_or_path=config.pretrained_model_name_or_path or self.flavour.pretrained,
            pretrained_transformer_model_name_or_path=config.pretrained_transformer_model_name_or_path,
            pretrained_transformer_subfolder=config.pretrained_transformer_subfolder,
            pretrained_vae_model_name_or_path=config.pretrained_vae_model_name_or_path,
            pretrained_text_encoder_model_name_or_path=config.pretrained_gemma_model_name_or_path,
            revision=config.revision,
            variant=config.variant,
            assistant_lora_path=config.assistant_lora_path,
            assistant_lora_weight_name=config.assistant_lora_weight_name,
            disable_assistant_lora=config.disable_assistant_lora,
        )
        # Frozen weights are stored in the autocast dtype (fp16 runs keep fp16 weights, since bf16
        # weights under fp16 autocast would be cast on every matmul); fp32 when asked or unmixed.
        if mixed == "no" or config.base_model_default_dtype == "fp32":
            weight_dtype = torch.float32
        else:
            weight_dtype = _DTYPES[mixed]
        self.model_identity = f"{self.family.name}:{source.pretrained_model_name_or_path}:{source.pretrained_transformer_model_name_or_path}"
        # Names that plugins resolve are checked now, before minutes of loading.
        build_optimizer = optimizers.load(config.optimizer)
        build_scheduler = lr_schedulers.load(config.lr_scheduler)

        # Data first: a wrong folder, an empty dataset or one smaller than a batch fails in
        # seconds, before any weights load. The eval dataset is cached but never trained on.
        self.eval_dataset_id = evaluation.check_eval_dataset(config, self.datasets)
        self.data = TrainingData(
            self.datasets,
            cache_root=config.cache_dir,
            model_identity=self.model_identity,
            seed=config.seed,
            progress=self.progress,
            conditioning_sampling=config.conditioning_multidataset_sampling,
        )
        self.data.discover()
        check_reference_support(self.data, self.family, self.flavour.name)
        self.sampler = self.data.build_sampler(
            config.train_batch_size,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            exclude=[self.eval_dataset_id] if self.eval_dataset_id else (),
        )
        self.total_steps = config.total_steps(self.data.batches_per_epoch)

        self.model = self.family.load(source, self.flavour.name, dtype=weight_dtype, device="cpu")
        self.family.configure_training(self.model, config.family_options)
        # The noise scheme is the family's declaration: None trains flow matching (tune_train.flow).
        self.ddpm = ddpm.scheme_for(self.family, self.model, config)
        # Caches are filled before anything big moves to the accelerator.
        self._cache_embeddings()

        transformer = self.model.transformer
        if config.base_model_precision not in (None, "no_change"):
            if config.quantize_via == "accelerator" and self.accelerator.device.type != "cpu":
                # Block by block on the GPU: fast, and the blocks block swap will stream go
                # straight back to the CPU, so the whole bf16 model is never on the device.
                from tune_quant.blockwise import quantise_blockwise

                quantise_blockwise(
                    transformer, config.base_model_precision, device=self.accelerator.device,
                    offload_last=config.musubi_blocks_to_swap, offload_device=config.musubi_block_swap_device,
                )
            else:
                from tune_quant.presets import quantise

                quantise(transformer, config.base_model_precision, device=self.accelerator.device.type)
        offload = config.offload_settings()
        offload.check_device(self.accelerator.device)
        if config.gradient_checkpointing:
            # None keeps diffusers' own checkpointing; offload_checkpointed_activations swaps in
            # one that parks each block's saved input in pinned CPU memory until backward.
            checkpoint_func = offload.gradient_checkpointing_func()
            if config.gradient_checkpointing_interval:  # only every Nth block; the rest keep activations
                from tune_offload.checkpointing import every_nth_checkpoint

                checkpoint_func = every_nth_checkpoint(transformer, config.gradient_checkpointing_interval, checkpoint_func)
            transformer.enable_gradient_checkpointing(checkpoint_func)
        # The PEFT LoRA / LyCORIS network / whole transformer to train (adapter_setup.py), started
        # from init_lora when set. Adapters train in fp32 unless the optimizer is built for
        # low-precision weights (adamw_bf16 keeps bf16 and makes up for rounding with Kahan sums).
        self.weights = build_trained_weights(
            self.model, self.family, config, optimizer_param_dtype=getattr(build_optimizer, "param_dtype", None)
        )
        self.trainable = self.weights.trainable
        offloaded = offload.strategy in ("block_swap", "group")
        if offloaded:
            # The strategy places what stays resident on the device and keeps the rest off it.
            from tune_offload.strategies import apply_offload

            apply_offload(transformer, offload, onload_device=self.accelerator.device)
        else:
            transformer.to(self.accelerator.device)
        transformer.train()

        self.optimizer = build_optimizer(self.trainable, config.learning_rate, config)
        self.lr_scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        # An offloaded transformer must not be moved whole onto the device by accelerate.
        self.model.transformer, self.optimizer = self.accelerator.prepare(
            transformer, self.optimizer, device_placement=[not offloaded, None]
        )
        self.ema = None
        if config.use_ema:
            on_cpu = config.ema_device == "cpu" or config.ema_cpu_only
            self.ema = EMA(
                self.trainable,
                decay=config.ema_decay,
                storage_device="cpu" if on_cpu else self.accelerator.device,
                update_on_storage=config.ema_cpu_only,
                update_interval=config.ema_update_interval or 1,
                foreach=not config.ema_foreach_disable,
                warmup_steps=config.ema_warmup_steps,
            )

        if self.resume_path is not None:
            self._resume(self.resume_path)
        # The data position of the last *completed* step: a checkpoint taken after Ctrl-C in the
        # middle of a step must not skip the micro-batches that step had already drawn.
        self._sampler_state = self.sampler.state_dict()
        if trackers:
            logging_dir = self.output_dir / config.logging_dir
            logging_dir.mkdir(parents=True, exist_ok=True)
            tracker_kwargs = init_kwargs(config.report_to, logging_dir=logging_dir, run_name=config.tracker_run_name)
            self.accelerator.init_trackers(
                config.tracker_project_name,
                config={k: v for k, v in attrs.asdict(config).items() if isinstance(v, (int, float, str, bool))},
                init_kwargs=tracker_kwargs,
            )
        self._is_setup = True

    def _cache_embeddings(self) -> None:
        """Fill the latent and text caches, moving each encoder to the device only while it runs.

        The VAE and the text encoders are never on the device together (SimpleTuner's
        ``offload_during_startup``, always on here: a 24 B text encoder beside the VAE is what
        runs a card out of memory), and a component moves only once something needs encoding,
        so a run whose caches are full moves nothing.
        """
        device = self.accelerator.device
        model, family = self.model, self.family
        moved: list[Any] = []
        caching = True

        def onload(*components: Any) -> None:
            if caching:  # on-demand VAE encoding during training keeps the VAE where it is
                for component in components:
                    if not any(component is m for m in moved):
                        component.to(device)
                        moved.append(component)

        def offload() -> None:
            for component in moved:
                component.to("cpu")
            moved.clear()

        def encode_images(pixels: Any) -> Any:
            onload(model.vae)
            return family.encode_images(model, pixels.to(device, model.vae.dtype))

        def encode_prompts(prompts: Any) -> Any:
            onload(*model.text_encoders)
            return family.encode_prompts(model, prompts)

        try:
            self.latents_encoded = self.data.cache_latents(encode_images, batch_size=self.config.vae_batch_size)
            offload()
            self.prompts_encoded = self.data.cache_text(encode_prompts)
        finally:
            offload()
            caching = False

    def _resume(self, path: Path) -> None:
        adapter, state, info = ckpt.load_checkpoint(path)
        named = dict(self._trainable_named())
        missing = sorted(set(named) - set(adapter))
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} lacks LoRA weights for {missing[:3]} (different lora_rank/target?)")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(adapter[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a run that was saved without it: start from the weights
                log.warning("checkpoint %s has no EMA state; the EMA starts from its weights", path)
                self.ema.shadow = [p.detach().to(self.ema.storage_device, torch.float32, copy=True) for p in self.trainable]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(info["step"])
        self.losses = list(state.get("losses", []))[: self.global_step]
        self.validation_images = {
            step: images for step, images in state.get("validation_images", {}).items() if step <= self.global_step
        }
        log.info("resumed from %s at step %d", path, self.global_step)

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        transformer = self.accelerator.unwrap_model(self.model.transformer)
        return [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ one step
    def compute_loss(self, dataset_id: str, batch: Sequence[Any], generator: torch.Generator) -> torch.Tensor:
        """Loss of one micro-batch in the family's noise scheme (flow matching, or DDPM epsilon /
        v-prediction with optional min-SNR weights), every random draw taken from ``generator``."""
        from tune_models.family import SampleGeometry

        config = self.config
        drop = (torch.rand(len(batch), generator=generator) < config.caption_dropout_probability).tolist()
        latents, prompts = self.data.load_batch(dataset_id, batch, drop, step=self.global_step)
        references = self.data.load_references(dataset_id, batch, step=self.global_step)
        device = self.accelerator.device
        scheme = self.ddpm
        if scheme is not None:
            # DDPM: integer timesteps; ``sigmas`` below carries them to ``family.predict``.
            sigmas = scheme.sample_timesteps(len(batch), generator)
        else:
            sigmas = flow.sample_sigmas(
                len(batch),
                generator,
                scheme=config.sigma_scheme(),
                scale=config.flow_sigmoid_scale,
                alpha=config.flow_beta_schedule_alpha,
                beta=config.flow_beta_schedule_beta,
            )
            width, height = batch[0].bucket  # every batch is one bucket
            shift = self.family.flow_shift(
                height,
                width,
                shift=config.flow_schedule_shift if config.flow_schedule_shift is not None else self.flavour.shift,
                auto_shift=config.flow_schedule_auto_shift,
                model=self.model,
            )
            sigmas = self.family.shift_sigmas(sigmas, shift)
        noise = torch.randn(latents.shape, generator=generator)
        # Optional draws come after the fixed ones, so turning an option on does not change the
        # sigmas and noise every run without it draws.
        if config.noise_offset > 0:
            noise = flow.offset_noise(
                noise, generator, offset=config.noise_offset, probability=config.noise_offset_probability
            )
        model_noise = noise
        if config.input_perturbation > 0:
            model_noise = noise + config.input_perturbation * torch.randn(latents.shape, generator=generator)
        if scheme is not None:
            noisy = scheme.add_noise(latents, model_noise, sigmas)
            target = scheme.target(latents, noise, sigmas)
        else:
            noisy = flow.add_noise(latents, model_noise, sigmas)
            target = flow.velocity_target(latents, noise)
        dtype = self.accelerator.unwrap_model(self.model.transformer).dtype
        prompt_batch = self.family.collate_prompts(prompts, device=device, dtype=dtype)
        # Per-sample geometry (original size, crop, target size) for families that condition on
        # it (size/crop micro-conditioning); the others add nothing.
        geometry = [SampleGeometry.from_planned(planned) for planned in batch]
        prompt_batch.update(self.family.batch_conditions(self.model, geometry, device=device, dtype=dtype))
        with self.accelerator.autocast():
            prediction = self.family.predict(
                self.model, noisy.to(device), sigmas.to(device), prompt_batch,
                **reference_kwargs(references, dataset_id, device),
            )
        if scheme is not None:
            return scheme.loss(prediction, target, sigmas, noisy=noisy)
        return torch.nn.functional.mse_loss(prediction.float(), target.to(device).float())

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        config = self.config
        step = self.global_step
        accumulation = config.gradient_accumulation_steps
        # LoRA dropout draws from torch's global RNG: seed it from the position too.
        torch.manual_seed(step_generator(config.seed, step, 997).initial_seed())
        total = 0.0
        for micro in range(accumulation):
            dataset_id, batch = next(self.sampler_iter)
            sync = micro == accumulation - 1
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model.transformer)
            with context:
                loss = self.compute_loss(dataset_id, batch, step_generator(config.seed, step, micro))
                loss = self._prior_weighted(dataset_id, batch, loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step + 1} (dataset {dataset_id!r}); stopping "
                        "before anything is saved. Lower learning_rate or use mixed_precision bf16."
                    )
                self.accelerator.backward(loss / accumulation)
            total += loss.item() / accumulation
        bad = nonfinite_groups([(name, p.grad) for name, p in self._trainable_named()])
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient at step {step + 1} in {len(bad)} parameter(s), first "
                f"{', '.join(bad[:3])}; stopping before anything is saved. Lower learning_rate or "
                "check the data."
            )
        if config.max_grad_norm and config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        self._sampler_state = self.sampler.state_dict()
        return {"loss": total, "lr": self.lr_scheduler.get_last_lr()[0]}

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        """Run to ``max_train_steps`` (or ``num_train_epochs``), then export. Ctrl-C saves first."""
        if not self._is_setup:
            self.setup()
        config = self.config
        self.sampler_iter = iter(self.sampler)
        self._trim_loss_log()
        self.hook.tune_train_start(trainer=self)
        if config.validation_on_startup and self.global_step == 0:
            self.validate()
        if self.global_step == 0:
            self.evaluate()  # the baseline eval_loss
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc="training",
            disable=not self.progress or not self.accelerator.is_main_process,
        )
        try:
            while self.global_step < self.total_steps:
                logs = self.train_step()
                self.losses.append(logs["loss"])
                self._log_step(logs)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                self.hook.tune_step_end(trainer=self, step=self.global_step, logs=logs)
                epoch = self._epoch_ended()
                if epoch:
                    # vae_cache_clear_each_epoch: one rank deletes, every rank re-plans.
                    self.accelerator.wait_for_everyone()
                    self.data.end_epoch(epoch, delete=self.accelerator.is_main_process)
                    self.accelerator.wait_for_everyone()
                if (config.checkpoint_step_interval and self.global_step % config.checkpoint_step_interval == 0) or (
                    epoch and config.checkpoint_epoch_interval and epoch % config.checkpoint_epoch_interval == 0
                ):
                    self.save_checkpoint()
                if self.global_step < self.total_steps and (
                    (config.validation_step_interval and self.global_step % config.validation_step_interval == 0)
                    or (epoch and config.validation_epoch_interval and epoch % config.validation_epoch_interval == 0)
                ):
                    self.validate()
                if self.global_step < self.total_steps and evaluation.eval_due(
                    config, self.global_step, self.data.batches_per_epoch
                ):
                    self.evaluate()
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            log.warning("interrupted at step %d; saved %s. Resume with resume_from_checkpoint=latest", self.global_step, path)
            raise
        bar.close()
        outputs: dict[str, str] = {}
        last = ckpt.list_checkpoints(self.output_dir)
        if not last or last[-1][0] != self.global_step:
            outputs["checkpoint"] = str(self.save_checkpoint())
        else:
            outputs["checkpoint"] = str(last[-1][1])
        self.validate()
        self.evaluate()
        if (self.output_dir / evaluation.EVAL_LOG).exists():  # eval_loss and/or clip_score rows
            outputs["eval_log"] = str(self.output_dir / evaluation.EVAL_LOG)
        outputs["loss_log"] = str(self.output_dir / LOSS_LOG)
        outputs["validation"] = str(self.output_dir / "validation")
        for tracker in _trackers(config.report_to):
            outputs[tracker] = str(self.output_dir / config.logging_dir)
        if self.ema is not None and self.accelerator.is_main_process:
            outputs["lora_ema"] = str(self._export_ema())
        self.accelerator.end_training()
        # Exporters (tune-publish's built-in writes the LoRA file and the model card) and
        # publishers attach here and add what they wrote to ``outputs``.
        self.hook.tune_train_end(trainer=self, outputs=outputs)
        if self.accelerator.is_main_process and not {"lora", "transformer"} & outputs.keys():
            log.warning(
                "no exporter plugin wrote the LoRA file (is tune-publish installed? "
                "pip install tune-publish); the adapter is in %s", outputs["checkpoint"]
            )
        return TrainResult(outputs=outputs, global_step=self.global_step, losses=list(self.losses))

    def _epoch_ended(self) -> int | None:
        """The epoch number (1-based) when the step just taken finished an epoch, else None."""
        per_epoch = self.data.batches_per_epoch
        accumulation = self.config.gradient_accumulation_steps
        before = (self.global_step - 1) * accumulation // per_epoch
        after = self.global_step * accumulation // per_epoch
        return after if after > before else None

    def _trim_loss_log(self) -> None:
        """On resume, drop loss rows past the checkpoint so the log continues cleanly."""
        if self.accelerator.is_main_process:
            LossLog(self.output_dir / LOSS_LOG).trim_after(self.global_step)
            evaluation.EvalLog(self.output_dir / evaluation.EVAL_LOG).trim_after(self.global_step)

    def _log_step(self, logs: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        LossLog(self.output_dir / LOSS_LOG).append(self.global_step, logs["loss"], logs["lr"])
        if _trackers(self.config.report_to):
            self.accelerator.log({"train/loss": logs["loss"], "train/lr": logs["lr"]}, step=self.global_step)

    # ------------------------------------------------------------------ saving
    def _check_disk(self) -> None:
        """Apply ``disk_low_action`` while ``output_dir`` has less free space than the threshold."""
        config = self.config
        threshold = config.disk_low_bytes()
        if threshold is None:
            return
        ran_script = False
        while (free := shutil.disk_usage(self.output_dir).free) < threshold:
            message = f"only {free / 1024**3:.2f} GiB free in {self.output_dir} (disk_low_threshold {config.disk_low_threshold})"
            if config.disk_low_action == "stop":
                raise DiskLowError(f"{message}; stopping at step {self.global_step} without saving")
            if config.disk_low_action == "script":
                if ran_script:
                    raise DiskLowError(f"{message} after running disk_low_script; stopping at step {self.global_step}")
                log.warning("%s; running disk_low_script", message)
                subprocess.run(config.disk_low_script, shell=True, check=True)
                ran_script = True
                continue
            log.warning("%s; waiting for space", message)
            time.sleep(60)

    @contextlib.contextmanager
    def _eval_weights(self):
        """The weights to evaluate and export: schedule-free optimizers train one point (``y``) and
        evaluate another (``x``); ``eval()`` moves the parameters there. The trained values are
        restored exactly afterwards (``train()`` alone would round-trip them through float maths
        and a checkpointed run would drift from an uninterrupted one)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not (hasattr(inner, "eval") and hasattr(inner, "train") and "train_mode" in inner.param_groups[0]):
            yield
            return
        saved = [p.detach().clone() for p in self.trainable]
        inner.eval()
        try:
            yield
        finally:
            inner.train()
            with torch.no_grad():
                for p, value in zip(self.trainable, saved):
                    p.copy_(value)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` (LoRA, optimizer, schedule, EMA, data position) atomically."""
        self.accelerator.wait_for_everyone()
        path = self.output_dir / f"checkpoint-{self.global_step}"
        if self.accelerator.is_main_process:
            self._check_disk()
            state = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "sampler": self._sampler_state,
                "losses": list(self.losses),
                "validation_images": self.validation_images,
            }
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            lora = None
            if self.weights.kind == "lora":  # a checkpoint loads into a diffusers pipeline as it is
                with self._eval_weights():
                    lora = (self._lora_state_dict(), self._lora_header())
            path = ckpt.save_checkpoint(
                self.output_dir,
                self.global_step,
                adapter={name: p.detach() for name, p in self._trainable_named()},
                training_state=state,
                info={"model_family": self.family.name, "flavour": self.flavour.name},
                lora=lora,
                total_limit=self.config.checkpoints_total_limit,
            )
            self.hook.tune_checkpoint_saved(trainer=self, step=self.global_step, path=str(path))
        return path

    def _lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights.state_dict(self.model)

    def ema_lora_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights in the same diffusers layout as the LoRA file, or None without EMA."""
        if self.ema is None:
            return None
        with self.ema.swapped_in():
            return self._lora_state_dict()

    def _export_ema(self) -> Path:
        """Write ``pytorch_lora_weights_ema.safetensors`` beside the LoRA, in the run's lora_format."""
        from safetensors.torch import save_file

        tensors = self.ema_lora_state_dict()
        if self.config.lora_format == "comfyui":
            tensors = self.family.to_comfyui(tensors, alpha=self.config.lora_scale_alpha())
        path = self.output_dir / "pytorch_lora_weights_ema.safetensors"
        header = self._lora_header() | {"tune.ema_decay": str(self.config.ema_decay)}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata=header)
        return path

    def _lora_header(self) -> dict[str, str]:
        """diffusers' adapter metadata (so loaders apply our alpha) plus where the weights came from."""
        return self.weights.header(self.model) | {"tune.step": str(self.global_step)}

    def trained_adapter(self) -> TrainedAdapter:
        """The adapter as it stands now, for exporters (``tune_train_end``) and notebooks."""
        config = self.config
        # ComfyUI files carry alpha per module (diffusers files carry it in the header metadata).
        to_comfyui = functools.partial(self.family.to_comfyui, alpha=config.lora_scale_alpha())
        with self._eval_weights():
            state_dict = self._lora_state_dict()
        return TrainedAdapter(
            state_dict=state_dict,
            ema_state_dict=self.ema_lora_state_dict(),
            header=self._lora_header(),
            output_dir=self.output_dir,
            family=self.family.name,
            flavour=self.flavour.name,
            base_model=config.pretrained_model_name_or_path or self.flavour.pretrained,
            lora_format=config.lora_format,
            to_comfyui=to_comfyui,
            step=self.global_step,
            adapter_type=self.weights.kind,
            model_config=self.weights.model_config(self.model),
            settings={
                "steps": self.global_step,
                "learning_rate": config.learning_rate,
                "lora_rank": config.lora_rank,
                "lora_alpha": config.lora_scale_alpha(),
                "train_batch_size": config.train_batch_size,
                "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "mixed_precision": config.mixed_precision,
                "lr_scheduler": config.lr_scheduler,
                "optimizer": config.optimizer,
                "lora_format": config.lora_format,
                "final_loss": round(self.losses[-1], 6) if self.losses else None,
            },
            validation_images=self._card_images(),
        )

    def _card_images(self) -> list[tuple[str, str]]:
        """The last validation images first (the hub widget shows them), then the before-training ones."""
        if not self.validation_images:
            return []
        steps = sorted(self.validation_images)
        images = list(self.validation_images[steps[-1]])
        if steps[0] != steps[-1]:
            images += [(f"{prompt} (before training)", path) for prompt, path in self.validation_images[steps[0]]]
        return images

    # ------------------------------------------------------------------ validation
    def validation_prompts(self) -> list[tuple[str, str]]:
        """(name, prompt) pairs from ``validation_prompt`` and ``user_prompt_library``."""
        prompts: list[tuple[str, str]] = []
        if self.config.validation_prompt:
            prompts.append(("validation", self.config.validation_prompt))
        if self.config.user_prompt_library:
            library = json.loads(Path(self.config.user_prompt_library).read_text())
            items = library.items() if isinstance(library, dict) else enumerate(library)
            for name, prompt in items:
                prompts.append((str(name), prompt if isinstance(prompt, str) else prompt["prompt"]))
        return prompts

    def validate(self) -> list[str]:
        """Images for every validation prompt and size, made without the assistant adapter."""
        config = self.config
        prompts = self.validation_prompts()
        if config.validation_disable or not prompts or not self.accelerator.is_main_process:
            return []
        try:  # a flavour may have no text-to-image pipeline (e.g. a refiner): train on, say so once
            self.family.validation_pipeline(self.model)
        except NotImplementedError as exc:
            if not getattr(self, "_validation_warned", False):
                log.warning("no validation images: %s", exc)
                self._validation_warned = True
            return []
        from tune_models.adapters import set_assistant_enabled

        folder = self.output_dir / "validation" / f"step-{self.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        model = self.model
        transformer = self.accelerator.unwrap_model(model.transformer)
        set_assistant_enabled(model, False)
        transformer.eval()
        model.vae.to(self.accelerator.device)
        for encoder in model.text_encoders:
            encoder.to(self.accelerator.device)
        pipeline = self.family.validation_pipeline(model)
        paths = []
        # (file suffix, weights): the trained weights (in their evaluation form for schedule-free
        # optimizers) and/or the EMA weights, as ema_validation asks.
        variants: list[tuple[str, Any]] = [("", contextlib.nullcontext)]
        if self.ema is not None and config.ema_validation != "none":
            ema_variant = ("-ema", self.ema.swapped_in)
            variants = [ema_variant] if config.ema_validation == "ema_only" else [*variants, ema_variant]
        try:
            with torch.no_grad(), self._eval_weights():
                for suffix, weights in variants:
                    with weights():
                        paths += self._validation_images(pipeline, prompts, folder, suffix)
        finally:
            model.vae.to("cpu")
            for encoder in model.text_encoders:
                encoder.to("cpu")
            transformer.train()
            set_assistant_enabled(model, True)
        if config.evaluation_type == "clip":
            self._score_validation(evaluation.validation_prompt_pairs(prompts, config.validation_sizes(), paths))
        self.hook.tune_validation_end(trainer=self, step=self.global_step, images=paths)
        return paths

    def _validation_images(self, pipeline: Any, prompts: list[tuple[str, str]], folder: Path, suffix: str) -> list[str]:
        config = self.config
        paths = []
        for name, prompt in prompts:
            for width, height in config.validation_sizes():
                image = self.family.generate(
                    pipeline,
                    prompt,
                    width=width,
                    height=height,
                    steps=config.validation_num_inference_steps or self.flavour.inference_steps,
                    guidance=config.validation_guidance if config.validation_guidance is not None else self.flavour.guidance,
                    seed=config.validation_seed,
                    negative_prompt=config.validation_negative_prompt,
                    options=config.validation_options(),  # family-specific keys; others warn once
                )
                path = folder / f"{_slug(name)}-{width}x{height}{suffix}.png"
                image.save(path)
                paths.append(str(path))
                label = f"{prompt} (EMA)" if suffix else prompt
                self.validation_images.setdefault(self.global_step, []).append(
                    (label, str(path.relative_to(self.output_dir)))
                )
        return paths

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """``eval_loss`` on the held-out ``eval_dataset_id`` (fixed timesteps and noise, see
        :mod:`tune_train.evaluation`), logged to ``eval_log.csv`` and the trackers; None when off."""
        if not self.eval_dataset_id or self.config.eval_loss_disable:
            return None
        with self._eval_weights():
            value = evaluation.eval_loss(self, self.eval_dataset_id)
        self.eval_losses[self.global_step] = value
        self._log_metrics({"eval_loss": value})
        return value

    def _prior_weighted(self, dataset_id: str, batch: Sequence[Any], loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss with regularisation samples weighted by ``prior_loss_weight``."""
        dataset = self.data.prepared.get(dataset_id)
        if dataset is None or self.config.prior_loss_weight == 1.0:
            return loss
        regularisation = [bool(dataset.config.is_regularisation_data)] * len(batch)
        return evaluation.weighted_batch_loss(
            loss, evaluation.sample_loss_weights(regularisation, self.config.prior_loss_weight)
        )

    def _score_validation(self, pairs: list[tuple[str, str]]) -> None:
        """Mean CLIP score of the images just made (``clip_score``; ``clip_score_ema`` for the EMA ones)."""
        if not pairs:
            return
        if self._clip is None:
            self._clip = evaluation.ClipScorer(self.config.pretrained_evaluation_model_name_or_path, self.accelerator.device)
        scores = self._clip.scores(pairs)
        groups: dict[str, list[float]] = {}
        for (_, path), score in zip(pairs, scores):
            groups.setdefault("clip_score_ema" if Path(path).stem.endswith("-ema") else "clip_score", []).append(score)
        means = {name: sum(values) / len(values) for name, values in groups.items()}
        if "clip_score" in means:
            self.clip_scores[self.global_step] = means["clip_score"]
        self._log_metrics(means)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        log_file = evaluation.EvalLog(self.output_dir / evaluation.EVAL_LOG)
        for name, value in metrics.items():
            log_file.append(self.global_step, name, value)
            log.info("step %d: %s %.6f", self.global_step, name, value)
        if _trackers(self.config.report_to):
            self.accelerator.log(dict(metrics), step=self.global_step)
