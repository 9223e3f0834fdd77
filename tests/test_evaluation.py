"""Issue 5 end to end on tiny models: eval loss on a held-out dataset (flow and DDPM families),
prior-preservation weighting of regularisation samples, and CLIP scores of validation images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tune.config import load_config
from tune_train import evaluation
from tune_train.trainer import Trainer as Loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory) -> Path:
    from tune_data.testing import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("held-out"), count=3, size=(32, 32), seed=7)


def _run(write_run, root: Path, model: Path, data: Path, steps: int, *, extra_datasets=(), **extra) -> Loop:
    config = write_run(root, model=model, data=data, steps=steps, extra=extra)
    backend = root / "multidatabackend.json"
    datasets = json.loads(backend.read_text())
    base = {k: datasets[0][k] for k in ("type", "caption_strategy", "resolution", "resolution_type",
                                        "minimum_image_size", "crop", "crop_aspect")}
    datasets[1:1] = [{**base, **d} for d in extra_datasets]
    backend.write_text(json.dumps(datasets))
    loaded = load_config(config)
    assert not {"eval_dataset_id", "eval_steps_interval", "eval_timesteps", "evaluation_type",
                "pretrained_evaluation_model_name_or_path", "ema_warmup_steps"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def _image_file(loop: Loop, dataset_id: str, planned) -> str:
    return str(Path(loop.data.prepared[dataset_id].config.instance_data_dir) / planned.record.path)


def _spy_batches(loop: Loop) -> list[tuple[str, list[str]]]:
    """Record every training micro-batch (dataset, image files) the loop computes a loss on."""
    seen: list[tuple[str, list[str]]] = []
    original = loop.compute_loss

    def compute_loss(dataset_id, batch, generator):
        seen.append((dataset_id, [_image_file(loop, dataset_id, planned) for planned in batch]))
        return original(dataset_id, batch, generator)

    loop.compute_loss = compute_loss
    return seen


def _eval_rows(root: Path) -> list[dict]:
    return list(csv.DictReader((root / "output" / evaluation.EVAL_LOG).open()))


def test_eval_loss_is_seed_independent_before_training_moves_with_the_lora_and_is_never_trained_on(
    tmp_path, tiny_zimage, shapes_dir, held_out_dir, write_run
):
    held = {"id": "held", "instance_data_dir": str(held_out_dir)}
    values = {}
    for seed in (3, 11):
        root = tmp_path / f"seed{seed}"
        loop = _run(write_run, root, tiny_zimage, shapes_dir, 4, extra_datasets=[held],
                    **{"--seed": seed, "--learning_rate": 5e-2, "--eval_dataset_id": "held",
                       "--eval_steps_interval": 2, "--eval_timesteps": 3})
        seen = _spy_batches(loop)
        result = loop.train()
        values[seed] = dict(loop.eval_losses)
        # Held out: the eval images are cached and scored, but no training batch ever holds one.
        assert len(seen) == 4 and {dataset_id for dataset_id, _ in seen} == {"shapes"}
        held_paths = {_image_file(loop, "held", p) for images in loop.data.prepared["held"].buckets.values() for p in images}
        assert len(held_paths) == 3 and not held_paths & {path for _, paths in seen for path in paths}
        assert sorted(loop.eval_losses) == [0, 2, 4]
        rows = _eval_rows(root)
        assert [(int(r["step"]), r["metric"]) for r in rows] == [(0, "eval_loss"), (2, "eval_loss"), (4, "eval_loss")]
        assert result.outputs["eval_log"].endswith("eval_log.csv")
    # Step 0: the LoRA changes nothing yet, so different seeds give the bit-identical number.
    assert values[3][0] == values[11][0]
    # The number moves as the LoRA trains (and the runs, with different data order, part ways).
    assert values[3][4] != values[3][0] and values[11][4] != values[11][0]
    assert values[3][4] != values[11][4]


@pytest.mark.parametrize("loss_keys", [{"--snr_gamma": 5.0}, {"--diff2flow_enabled": True, "--diff2flow_loss": True}],
                         ids=["min-snr", "diff2flow"])
def test_eval_loss_of_a_ddpm_family_uses_its_scheme_and_is_repeatable(
    tmp_path, shapes_dir, held_out_dir, write_run, monkeypatch, tmp_path_factory, loss_keys
):
    from tune_models.testing import build_tiny_pipeline

    tiny_sdxl = build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl-eval"))
    grids = []
    original = evaluation.eval_timestep_grid
    monkeypatch.setattr(evaluation, "eval_timestep_grid", lambda scheme, n: grids.append(scheme) or original(scheme, n))
    loop = _run(write_run, tmp_path, tiny_sdxl, shapes_dir, 2,
                extra_datasets=[{"id": "held", "instance_data_dir": str(held_out_dir)}],
                **{"--model_family": "sdxl", "--model_flavour": "base", "--learning_rate": 5e-2,
                   "--eval_dataset_id": "held", "--eval_timesteps": 3, **loss_keys})
    loop.train()
    assert grids and all(scheme is loop.ddpm for scheme in grids)
    assert sorted(loop.eval_losses) == [0, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in loop.eval_losses.values())
    assert loop.eval_losses[2] != loop.eval_losses[0]
    assert loop.evaluate() == loop.eval_losses[2]  # same weights, same problem: the same number


def test_prior_loss_weight_scales_only_regularisation_batches(tmp_path, tiny_zimage, shapes_dir, held_out_dir, write_run):
    loop = _run(write_run, tmp_path, tiny_zimage, shapes_dir, 8,
                extra_datasets=[{"id": "prior", "instance_data_dir": str(held_out_dir), "is_regularisation_data": True}],
                **{"--prior_loss_weight": 0.25, "--train_batch_size": 1})
    loop.setup()
    raw: list[tuple[str, float]] = []
    original = loop.compute_loss

    def compute_loss(dataset_id, batch, generator):
        loss = original(dataset_id, batch, generator)
        raw.append((dataset_id, loss.item()))
        return loss

    loop.compute_loss = compute_loss
    backward = loop.accelerator.backward
    backed: list[float] = []

    def spy_backward(loss, **kwargs):
        backed.append(loss.item())
        return backward(loss, **kwargs)

    loop.accelerator.backward = spy_backward
    loop.train()
    assert len(raw) == len(backed) == 8
    assert {dataset_id for dataset_id, _ in raw} == {"shapes", "prior"}
    for (dataset_id, value), used in zip(raw, backed):
        expected = value * (0.25 if dataset_id == "prior" else 1.0)
        assert used == pytest.approx(expected, rel=1e-6), dataset_id


def _tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from tune_models.families._shared import clip_tokenizer

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16,
        )
    ).eval()
    # Random towers give random-signed cosines (a score of 0 after clamping, which would test
    # nothing): give both towers' pooled outputs a shared offset, so scores land inside (0, 100)
    # and still depend on the image and the prompt.
    with torch.no_grad():
        for norm in (model.text_model.final_layer_norm, model.vision_model.post_layernorm):
            norm.weight.fill_(0.3)
            norm.bias.fill_(1.0)
        model.visual_projection.weight.copy_(model.text_projection.weight)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_score_of_validation_images_is_logged(tmp_path, tiny_zimage, shapes_dir, write_run):
    clip = _tiny_clip(tmp_path / "clip")
    root = tmp_path / "run"
    loop = _run(write_run, root, tiny_zimage, shapes_dir, 1,
                **{"--validation_disable": False, "--validation_prompt": "a blue square",
                   "--validation_resolution": "32", "--validation_num_inference_steps": 2,
                   "--evaluation_type": "clip", "--pretrained_evaluation_model_name_or_path": str(clip)})
    loop.train()
    assert sorted(loop.clip_scores) == [0, 1]
    assert all(0.0 < v < 100.0 for v in loop.clip_scores.values())
    assert [(int(r["step"]), r["metric"]) for r in _eval_rows(root)] == [(0, "clip_score"), (1, "clip_score")]
    # The logged number is 100 x cos(image, prompt) in the CLIP model's joint space.
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    image = next((root / "output" / "validation" / "step-000001").glob("*.png"))
    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    inputs = processor(text=["a blue square"], images=[Image.open(image).convert("RGB")], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = evaluation._features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = evaluation._features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    cosine = torch.nn.functional.cosine_similarity(img, txt).item()
    assert loop.clip_scores[1] == pytest.approx(100 * max(cosine, 0.0), abs=1e-4)
    other = evaluation.ClipScorer(str(clip)).scores([("a red circle", image), ("a blue square", image)])
    assert other[1] == pytest.approx(loop.clip_scores[1], abs=1e-4) and other[0] != other[1]


def test_a_resumed_run_trims_the_eval_log_and_reports_the_same_eval_loss(
    tmp_path, tiny_zimage, shapes_dir, held_out_dir, write_run
):
    held = [{"id": "held", "instance_data_dir": str(held_out_dir)}]
    settings = {"--learning_rate": 5e-2, "--eval_dataset_id": "held", "--eval_steps_interval": 2,
                "--eval_timesteps": 2, "--checkpoint_step_interval": 2}
    first = _run(write_run, tmp_path, tiny_zimage, shapes_dir, 4, extra_datasets=held, **settings)
    first.train()
    straight = dict(first.eval_losses)
    resumed = _run(write_run, tmp_path, tiny_zimage, shapes_dir, 4, extra_datasets=held,
                   **settings, **{"--resume_from_checkpoint": str(tmp_path / "output" / "checkpoint-2")})
    resumed.train()
    rows = [(int(r["step"]), float(r["value"])) for r in _eval_rows(tmp_path)]
    assert [step for step, _ in rows] == [0, 2, 4]  # the first run's step-4 row was dropped, then rewritten
    assert resumed.eval_losses == {4: pytest.approx(straight[4], rel=1e-6)}
