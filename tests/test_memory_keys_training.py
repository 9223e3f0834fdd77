"""The trainer's wiring of gradient_checkpointing_interval, enable_chunked_feed_forward,
text_encoder_N_precision and quantize_via: accelerator."""

from __future__ import annotations

import pytest
import torch


def _run(root, write_run, tiny_zimage, shapes_dir, steps=3, **extra):
    from tune import Trainer

    config = write_run(root, model=tiny_zimage, data=shapes_dir, steps=steps,
                       extra={"--mixed_precision": "no", "--gradient_checkpointing": True, **extra})
    trainer = Trainer.from_config(config, progress=False)
    return trainer, trainer.train()


def test_checkpointing_every_second_block_trains_the_same_lora(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune_offload.checkpointing import EveryNthCheckpoint

    _, every = _run(tmp_path / "every", write_run, tiny_zimage, shapes_dir)
    trainer, second = _run(tmp_path / "second", write_run, tiny_zimage, shapes_dir,
                           **{"--gradient_checkpointing_interval": 2})
    transformer = trainer._run.model.transformer
    func = next(m._gradient_checkpointing_func for m in transformer.modules()
                if getattr(m, "_gradient_checkpointing_func", None) is not None)
    assert isinstance(func, EveryNthCheckpoint) and func.interval == 2
    assert second.losses == pytest.approx(every.losses, rel=1e-5)


def test_chunked_feed_forward_trains_the_same_lora_and_the_plan_says_so(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune.config import load_config
    from tune.plan import build_plan

    _, plain = _run(tmp_path / "plain", write_run, tiny_zimage, shapes_dir)
    chunked_keys = {"--enable_chunked_feed_forward": True, "--feed_forward_chunk_size": 5}
    trainer, chunked = _run(tmp_path / "chunked", write_run, tiny_zimage, shapes_dir, **chunked_keys)
    transformer = trainer._run.model.transformer
    sizes = {m._tune_ffn_chunk_size for m in transformer.modules() if "_tune_ffn_chunk_size" in m.__dict__}
    assert sizes == {5}  # every MLP runs its tokens as 5-token slices
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-5)
    config = write_run(tmp_path / "plan", model=tiny_zimage, data=shapes_dir, steps=1, extra=chunked_keys)
    assert "checkpointed 5-token slices" in build_plan(load_config(config))["precision"]["offload"]


def test_text_encoder_precision_quantises_the_encoder_and_keys_its_text_cache(
    tmp_path, tiny_zimage, shapes_dir, write_run
):

    def encoder_weight_types(trainer):
        encoder = trainer._run.model.text_encoders[0]
        return {type(m.weight).__name__ for m in encoder.modules() if isinstance(m, torch.nn.Linear)}

    plain_trainer, plain = _run(tmp_path / "plain", write_run, tiny_zimage, shapes_dir, steps=1)
    int8_trainer, int8 = _run(tmp_path / "int8", write_run, tiny_zimage, shapes_dir, steps=1,
                              **{"--text_encoder_1_precision": "int8-torchao"})
    assert encoder_weight_types(plain_trainer) == {"Parameter"}
    assert "Parameter" not in encoder_weight_types(int8_trainer)  # torchao's quantised tensors
    # Quantised encoders write their own text entries (another setting in the key), so the two
    # runs' caches never mix; the image latents are the same entries.
    def text_keys(root):
        return {p.name for p in (root / "cache").rglob("*.safetensors") if "text" in str(p.relative_to(root))}

    assert text_keys(tmp_path / "plain") and text_keys(tmp_path / "plain").isdisjoint(text_keys(tmp_path / "int8"))
    assert plain.losses[0] == pytest.approx(int8.losses[0], rel=0.2)  # close, not identical embeddings

    with pytest.raises(Exception, match="text_encoder_2_precision.*1 text encoder"):
        _run(tmp_path / "two", write_run, tiny_zimage, shapes_dir, steps=1,
             **{"--text_encoder_2_precision": "int8-torchao"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_via_accelerator_with_block_swap_matches_cpu_quantisation(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune_offload.strategies import is_offloaded

    common = {"--mixed_precision": "bf16", "--base_model_precision": "int8-torchao", "--musubi_blocks_to_swap": 1}
    _, on_cpu = _run(tmp_path / "cpu", write_run, tiny_zimage, shapes_dir, steps=4, **common)
    trainer, on_gpu = _run(tmp_path / "gpu", write_run, tiny_zimage, shapes_dir, steps=4,
                           **common, **{"--quantize_via": "accelerator"})
    assert is_offloaded(trainer._run.model.transformer)
    assert on_gpu.losses == pytest.approx(on_cpu.losses, rel=1e-3)
