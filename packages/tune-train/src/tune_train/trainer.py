"""The training loop, readable top to bottom: ``setup``, ``train_step``, ``train``, ``save_checkpoint``.

Exact resume is built in rather than bolted on: every random draw of a step (sigmas, noise, caption
dropout, LoRA dropout) comes from a generator seeded by ``(seed, step, micro-step)``, and the data
order comes from the sampler's saved position. A run resumed from ``checkpoint-N`` therefore
produces the same loss at step N+1 as a run that never stopped.

This module keeps the order of a run; the steps that are long but not part of that story live
beside it, and the Trainer keeps a thin method for each that tests and plugins call:

- :mod:`tune_train.setup_model`: accelerator, model source and dtype, quantisation, gradient
  checkpointing, offload, EMA, embedding caches, trackers (the pieces of ``setup``).
- :mod:`tune_train.run_state`: what a checkpoint holds beyond the weights, and resuming from it
  (:mod:`tune_train.checkpoint` is the folder format).
- :mod:`tune_train.validation`: validation prompts and images, card images, CLIP scores.
- :mod:`tune_train.artifacts`: the :class:`TrainedAdapter` handed to exporters, the EMA LoRA file.
- :mod:`tune_train.evaluation`: ``eval_loss``, prior-preservation weights, ``eval_log.csv``.
- :mod:`tune_train.optim`: optimizers, schedules, schedule-free evaluation weights.
"""

from __future__ import annotations

import contextlib
import logging
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
from tune_train import artifacts, run_state, setup_model, validation
from tune_train import checkpoint as ckpt
from tune_train import ddpm, distributed, evaluation, flow, optim, tread
from tune_train import text_encoder_training
from tune_train.artifacts import TrainedAdapter
from tune_train.config import TrainConfig
from tune_train.data import TrainingData, check_mask_support, check_reference_support, reference_kwargs
from tune_train.reference_inputs import check_prompt_references
from tune_train.masks import weighted_mse
from tune_train.loss_log import LossLog
from tune_train.registry import lr_schedulers, optimizers
from tune_quant.host_memory import release_free_memory

log = logging.getLogger(__name__)

LOSS_LOG = "loss_log.csv"


def _plugin_hook():
    """The lifecycle hooks of tune-train (``tune_step_end`` etc.), with every plugin loaded."""
    from tune_data.plugins import add_hookspecs, load_entry_points, plugin_manager, register_builtin
    from tune_train import hookspecs

    add_hookspecs(hookspecs)
    register_builtin("tune_train", "tune_train.builtins")
    load_entry_points()
    return plugin_manager().hook


def step_generator(seed: int, step: int, micro_step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator that depends only on the seed, the position in training and the process
    (each rank of a multi-GPU run draws its own noise and timesteps; rank 0 draws what a
    single-process run draws)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 101 + micro_step + rank * 998_244_353) % (2**63 - 1))


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
        """``eval_loss`` by step (one held-out dataset, or several with ``eval_dataset_pooling``:
        the loss over all their images); also in ``eval_log.csv``."""
        self.eval_losses_by_dataset: dict[str, dict[int, float]] = {}
        """``eval_loss/<id>`` by dataset id, then step (several held-out datasets without
        ``eval_dataset_pooling``); also in ``eval_log.csv``."""
        self.clip_scores: dict[int, float] = {}
        """Mean ``clip_score`` of the validation images by step (``evaluation_type: clip``)."""
        self._clip: evaluation.ClipScorer | None = None
        self.token_router: tread.TokenRouter | None = None
        """TREAD routing of the training forwards (``tread_config``), installed by :meth:`setup`."""
        self._is_setup = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load the model, prepare data and caches, build the optimizer, and resume if asked."""
        from accelerate.utils import set_seed

        from tune_models.family import get_family
        from tune_models.flavour_facts import default_flavour_note
        from tune_train.adapter_setup import build_trained_weights

        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_partials(self.output_dir)

        # Resolve the resume point first: a wrong path should fail before minutes of loading.
        self.resume_path = None
        if config.resume_from_checkpoint:
            self.resume_path = ckpt.resolve_resume_path(self.output_dir, config.resume_from_checkpoint)

        trackers = _trackers(config.report_to)
        setup_model.apply_torch_settings(config)  # torch_num_threads, disable_tf32
        self.accelerator = setup_model.make_accelerator(config, self.output_dir, trackers)
        set_seed(config.seed)
        self.hook = _plugin_hook()

        # Model: frozen base weights in the storage dtype; the LoRA trains in fp32.
        self.family = get_family(config.model_family)
        self.flavour = self.family.flavour(config.model_flavour)
        if config.model_flavour is None and self.accelerator.is_main_process:
            note = default_flavour_note(
                self.family.name, self.family.default_flavour, self.family.simpletuner_default_flavour,
                self.family.flavour_aliases, self.family.unavailable_flavours,
            )
            if note:
                log.warning(note)
        setup_model.choose_attention_backends(self.family, self.accelerator.device)
        source = setup_model.model_source(config, self.family, self.flavour, self.accelerator.device)
        weight_dtype = setup_model.storage_dtype(config)
        self.model_identity = f"{self.family.name}:{source.pretrained_model_name_or_path}:{source.pretrained_transformer_model_name_or_path}"
        # Names that plugins resolve are checked now, before minutes of loading.
        build_optimizer = optimizers.load(config.optimizer)
        build_scheduler = lr_schedulers.load(config.lr_scheduler)

        # Data first: a wrong folder, an empty dataset or one smaller than a batch fails in
        # seconds, before any weights load. The eval dataset is cached but never trained on.
        # Held out: eval_dataset_id and every dataset_type eval dataset.
        self.eval_dataset_ids = evaluation.check_eval_datasets(config, self.datasets)
        self.eval_dataset_id = config.eval_dataset_id or next(iter(self.eval_dataset_ids), None)
        self.data = TrainingData(
            self.datasets,
            cache_root=config.cache_dir,
            model_identity=self.model_identity,
            seed=config.seed,
            progress=self.progress,
            conditioning_sampling=config.conditioning_multidataset_sampling,
            text_settings=setup_model.text_cache_settings(config),
        )
        # Rank 0 discovers first and writes the metadata cache; the others then read it.
        with self.accelerator.main_process_first():
            self.data.discover()
        check_reference_support(self.data, self.family, self.flavour.name)
        check_prompt_references(self.data, self.family, self.flavour.name)
        check_mask_support(self.data, self.family)
        tread.check_support(self.family, config.tread_config)
        text_encoder_training.check_support(self.family, config)
        self.sampler = self.data.build_sampler(
            config.train_batch_size,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            exclude=self.eval_dataset_ids,
        )
        self.total_steps = config.total_steps(self.data.batches_per_epoch)

        self.model = self.family.load(source, self.flavour.name, dtype=weight_dtype, device="cpu")
        # Quantising while loading (quantize_via pipeline) leaves its freed temporaries with the
        # allocator; give them back to the OS (tune_quant.host_memory).
        release_free_memory()
        self.family.configure_training(self.model, config.family_options)
        setup_model.quantise_text_encoders(self.model, config, self.accelerator.device)
        setup_model.group_offload_encoders(self.model, config, self.accelerator.device)
        # The noise scheme is the family's declaration: None trains flow matching (tune_train.flow).
        self.ddpm = ddpm.scheme_for(self.family, self.model, config)
        setup_model.configure_vae(self.model, self.family, config)  # vae_enable_tiling / _slicing
        # Caches are filled before anything big moves to the accelerator.
        self._cache_embeddings()

        transformer = self.model.transformer
        device = self.accelerator.device
        offload = setup_model.quantise_and_checkpoint(transformer, config, device)
        # The PEFT LoRA / LyCORIS network / whole transformer to train (adapter_setup.py), started
        # from init_lora when set. Adapters train in fp32 unless the optimizer is built for
        # low-precision weights (adamw_bf16 keeps bf16 and makes up for rounding with Kahan sums).
        self.weights = build_trained_weights(
            self.model, self.family, config, optimizer_param_dtype=getattr(build_optimizer, "param_dtype", None)
        )
        self.trainable = self.weights.trainable
        # train_text_encoder: the LoRA'd encoders stay on the accelerator (they encode every step).
        text_encoder_training.place(self.model, device)
        # TREAD (tread_config): training forwards send a share of the image tokens around the
        # configured block spans; eval-mode forwards (validation, eval_loss) are untouched.
        self.token_router = tread.install(self.model, self.family, config.tread_config)
        offloaded = setup_model.place_transformer(transformer, offload, device)

        # With train_text_encoder the encoders' LoRA is a second parameter group at text_encoder_lr.
        # lr_scale: the builders get learning_rate (and text_encoder_lr) times the effective batch.
        optim_config = optim.scaled_learning_rates(config, self.accelerator.num_processes)
        if self.accelerator.is_main_process:
            log.info(
                "learning rate %g%s", optim_config.learning_rate,
                f" (learning_rate {config.learning_rate:g} x {optim.lr_scale_factor(config, self.accelerator.num_processes):g}, lr_scale)"
                if config.lr_scale else "",
            )
        params = text_encoder_training.param_groups(
            self.weights.transformer_params, self.weights.text_encoder_params, optim_config
        )
        self.optimizer = build_optimizer(params, optim_config.learning_rate, optim_config)
        self.lr_scheduler = build_scheduler(self.optimizer, optim_config, self.total_steps)
        # An offloaded transformer must not be moved whole onto the device by accelerate. With
        # several processes accelerate wraps it in DDP; only the training forward goes through
        # that wrapper (tune_train.distributed), everything else keeps the plain module.
        if self.accelerator.num_processes > 1:
            distributed.ignore_frozen_tensors(transformer)
        self._prepared_transformer, self.optimizer = self.accelerator.prepare(
            transformer, self.optimizer, device_placement=[not offloaded, None]
        )
        self.model.transformer = self.accelerator.unwrap_model(self._prepared_transformer)
        self._training_model = (
            self.model
            if self._prepared_transformer is self.model.transformer
            else attrs.evolve(self.model, transformer=distributed.training_view(self._prepared_transformer, self.model.transformer))
        )
        self.ema = setup_model.build_ema(config, self.trainable, device)

        if self.resume_path is not None:
            self._resume(self.resume_path)
        # The data position of the last *completed* step: a checkpoint taken after Ctrl-C in the
        # middle of a step must not skip the micro-batches that step had already drawn.
        self._sampler_state = self.sampler.state_dict()
        if trackers:
            setup_model.init_trackers(self.accelerator, config, self.output_dir)
        self._is_setup = True

    def _cache_embeddings(self) -> None:
        """Fill the latent and text caches (:func:`tune_train.setup_model.cache_embeddings`).
        With several processes each encodes its share, then all wait until every entry exists."""
        self.data.shard = (self.accelerator.process_index, self.accelerator.num_processes)
        self.latents_encoded, self.prompts_encoded = setup_model.cache_embeddings(
            self.accelerator.device, self.model, self.family, self.data, vae_batch_size=self.config.vae_batch_size
        )
        self.accelerator.wait_for_everyone()

    def _resume(self, path: Path) -> None:
        run_state.restore(self, path)

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        from tune_models.text_encoder_lora import named_parameters

        transformer = self.model.transformer  # the plain module, also under DDP (see setup)
        # Text-encoder LoRA weights (train_text_encoder) are named ``text_encoder.<parameter>``.
        return [(name, p) for name, p in transformer.named_parameters() if p.requires_grad] + named_parameters(self.model)

    # ------------------------------------------------------------------ one step
    def compute_loss(self, dataset_id: str, batch: Sequence[Any], generator: torch.Generator) -> torch.Tensor:
        """Loss of one micro-batch in the family's noise scheme (flow matching, or DDPM epsilon /
        v-prediction with optional min-SNR weights), every random draw taken from ``generator``;
        weighted by the batch's loss masks where its dataset has some (:mod:`tune_train.masks`)."""
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
        perturbation = flow.input_perturbation_strength(
            config.input_perturbation, config.input_perturbation_steps, self.global_step
        )
        if perturbation > 0:  # input_perturbation, decaying over input_perturbation_steps when set
            model_noise = noise + perturbation * torch.randn(latents.shape, generator=generator)
        if scheme is not None:
            noisy = scheme.add_noise(latents, model_noise, sigmas)
            target = scheme.target(latents, noise, sigmas)
        else:
            noisy = flow.add_noise(latents, model_noise, sigmas)
            target = flow.velocity_target(latents, noise)
        dtype = self.model.transformer.dtype
        if self.weights.text_encoder_params:  # train_text_encoder: the same captions, encoded live
            captions = self.data.batch_captions(dataset_id, batch, drop, step=self.global_step)
            with self.accelerator.autocast():
                prompts = text_encoder_training.live_prompts(self.family, self.model, captions, prompts)
        prompt_batch = self.family.collate_prompts(prompts, device=device, dtype=dtype)
        # Per-sample geometry (original size, crop, target size) for families that condition on
        # it (size/crop micro-conditioning); the others add nothing.
        geometry = [SampleGeometry.from_planned(planned) for planned in batch]
        # ... and the dataset's own settings (a per-dataset data_aesthetic_score, for one).
        prompt_batch.update(self.family.batch_conditions(
            self.model, geometry, device=device, dtype=dtype, dataset=self.data.prepared[dataset_id].config
        ))
        # Loss masks draw nothing from the generator: turning them on leaves the noise unchanged.
        mask = self.data.load_masks(dataset_id, batch, tuple(latents.shape[-2:]))
        if self.token_router is not None and mask is not None:
            self.token_router.keep_weighted(mask)  # TREAD never routes the masked-in tokens around
        mask = mask.to(device) if mask is not None else None
        with self.accelerator.autocast():
            prediction = self.family.predict(
                self._training_model, noisy.to(device), sigmas.to(device), prompt_batch,
                **reference_kwargs(references, dataset_id, device),
            )
        if scheme is not None:
            return scheme.loss(prediction, target, sigmas, noisy=noisy, mask=mask)
        return weighted_mse(prediction, target, mask)

    def _prior_weighted(self, dataset_id: str, batch: Sequence[Any], loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss with regularisation samples weighted by ``prior_loss_weight``."""
        dataset = self.data.prepared.get(dataset_id)
        if dataset is None or self.config.prior_loss_weight == 1.0:
            return loss
        regularisation = [bool(dataset.config.is_regularisation_data)] * len(batch)
        return evaluation.weighted_batch_loss(
            loss, evaluation.sample_loss_weights(regularisation, self.config.prior_loss_weight)
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        config = self.config
        step = self.global_step
        accumulation = config.gradient_accumulation_steps
        # LoRA dropout draws from torch's global RNG: seed it from the position too.
        torch.manual_seed(step_generator(config.seed, step, 997, self.accelerator.process_index).initial_seed())
        total = 0.0
        for micro in range(accumulation):
            dataset_id, batch = next(self.sampler_iter)
            sync = micro == accumulation - 1
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self._prepared_transformer)
            with context:
                loss = self.compute_loss(
                    dataset_id, batch, step_generator(config.seed, step, micro, self.accelerator.process_index)
                )
                loss = self._prior_weighted(dataset_id, batch, loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step + 1} (dataset {dataset_id!r}); stopping "
                        "before anything is saved. Lower learning_rate or use mixed_precision bf16."
                    )
                self.accelerator.backward(loss / accumulation)
            total += loss.item() / accumulation
        if self.accelerator.num_processes > 1:  # the logged loss is every rank's batch, not rank 0's
            total = self.accelerator.reduce(torch.tensor(total, device=self.accelerator.device), "mean").item()
        # Trained weights outside the DDP wrapper (train_text_encoder's LoRA) are averaged here.
        distributed.average_gradients(self.weights.text_encoder_params, self.accelerator)
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
        self.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
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
            # Beside the trained weights: the EMA LoRA file, or a full fine-tune's EMA model folder.
            outputs["transformer_ema" if self.weights.kind == "full" else "lora_ema"] = str(self._export_ema())
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

    def _eval_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights to evaluate and export (:func:`tune_train.optim.evaluation_weights`)."""
        return optim.evaluation_weights(self.optimizer, self.trainable)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` (LoRA, optimizer, schedule, EMA, data position) atomically."""
        self.accelerator.wait_for_everyone()
        path = self.output_dir / f"checkpoint-{self.global_step}"
        if self.accelerator.is_main_process:
            self._check_disk()
            state = run_state.training_state(self)
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
        # Every rank leaves only once the checkpoint exists: the end of train() looks for it on disk.
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ exporting
    def _lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights.state_dict(self.model)

    def ema_lora_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights in the same layout as the exported weights (the LoRA file's, or the
        whole denoiser's state dict for ``model_type: full``), or None without EMA."""
        if self.ema is None:
            return None
        if self.weights.kind == "full":
            return artifacts.full_ema_state_dict(self)
        with self.ema.swapped_in():
            return self._lora_state_dict()

    def _export_ema(self) -> Path:
        if self.weights.kind == "full":
            return artifacts.write_ema_model(self)
        return artifacts.write_ema_lora(self)

    def _lora_header(self) -> dict[str, str]:
        """diffusers' adapter metadata (so loaders apply our alpha) plus where the weights came from."""
        return self.weights.header(self.model) | {"tune.step": str(self.global_step)}

    def trained_adapter(self) -> TrainedAdapter:
        """The adapter as it stands now, for exporters (``tune_train_end``) and notebooks."""
        return artifacts.trained_adapter(self)

    def _card_images(self) -> list[tuple[str, str]]:
        return validation.card_images(self.validation_images)

    # ------------------------------------------------------------------ validation
    def validation_prompts(self) -> list[tuple[str, str]]:
        """(name, prompt) pairs from ``validation_prompt`` and ``user_prompt_library``."""
        return validation.validation_prompts(self.config)

    def validate(self) -> list[str]:
        """Images for every validation prompt and size (:func:`tune_train.validation.validate`)."""
        return validation.validate(self)

    def _score_validation(self, pairs: list[tuple[str, str]]) -> None:
        validation.score_validation(self, pairs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """``eval_loss`` on the held-out datasets (fixed timesteps and noise, see
        :mod:`tune_train.evaluation`), logged to ``eval_log.csv`` and the trackers as one number
        or one per dataset (``eval_dataset_pooling``). Returns the loss over all held-out images;
        None when off."""
        if not self.eval_dataset_ids or self.config.eval_loss_disable:
            return None
        with self._eval_weights():
            results = evaluation.held_out_losses(self)
        metrics = evaluation.eval_metrics(results, self.config.eval_dataset_pooling)
        pooled = evaluation.pooled_loss(results)
        if "eval_loss" in metrics:
            self.eval_losses[self.global_step] = pooled
        else:
            for dataset_id, (value, _) in results.items():
                self.eval_losses_by_dataset.setdefault(dataset_id, {})[self.global_step] = value
        self._log_metrics(metrics)
        return pooled

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        log_file = evaluation.EvalLog(self.output_dir / evaluation.EVAL_LOG)
        for name, value in metrics.items():
            log_file.append(self.global_step, name, value)
            log.info("step %d: %s %.6f", self.global_step, name, value)
        if _trackers(self.config.report_to):
            self.accelerator.log(dict(metrics), step=self.global_step)
