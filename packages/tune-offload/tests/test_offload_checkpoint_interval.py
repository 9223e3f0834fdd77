"""``gradient_checkpointing_interval``: only every Nth block is recomputed, gradients unchanged."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from tune_offload.block_swap import find_blocks
from tune_offload.checkpointing import every_nth_checkpoint


@pytest.fixture(scope="module")
def zimage():
    """A tiny real Z-Image transformer (6 blocks: 2 refiners + 4 layers), one trainable weight
    per block so each block's backward matters."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=4,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
        axes_lens=[512, 64, 64],
    )
    model.requires_grad_(False)
    for _, block in find_blocks(model):
        block.feed_forward.w2.weight.requires_grad_(True)
    return model


def _step(model) -> tuple[dict[str, torch.Tensor], Counter]:
    """One forward + backward; the gradients and how often each block ran."""
    runs: Counter = Counter()
    handles = [block.register_forward_pre_hook(lambda _m, _a, name=name: runs.update([name]))
               for name, block in find_blocks(model)]
    torch.manual_seed(1)
    x, caption, t = [torch.randn(16, 1, 8, 8)], [torch.randn(8, 32)], torch.tensor([0.4])
    model(x, t, caption, return_dict=False)[0][0].float().square().mean().backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, runs


@pytest.mark.parametrize("offload_activations", [False, True], ids=["torch-checkpoint", "offloaded"])
def test_every_second_block_is_recomputed_and_gradients_match(zimage, offload_activations):
    from tune_offload.activations import offloaded_checkpoint

    plain = copy.deepcopy(zimage)
    expected, plain_runs = _step(plain)
    assert set(plain_runs.values()) == {1}

    model = copy.deepcopy(zimage)
    inner = offloaded_checkpoint if offload_activations else None
    model.enable_gradient_checkpointing(every_nth_checkpoint(model, 2, inner))
    got, runs = _step(model)

    names = [name for name, _ in find_blocks(model)]
    assert names == ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1", "layers.2", "layers.3"]
    # Blocks 0, 2, 4 run twice (forward, then recomputed in backward); 1, 3, 5 once.
    assert [runs[name] for name in names] == [2, 1, 2, 1, 2, 1]
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_interval_one_checkpoints_every_block_and_bad_values_name_the_key(zimage):
    model = copy.deepcopy(zimage)
    model.enable_gradient_checkpointing(every_nth_checkpoint(model, 1))
    _, runs = _step(model)
    assert set(runs.values()) == {2}
    with pytest.raises(ValueError, match="gradient_checkpointing_interval must be >= 1, got 0"):
        every_nth_checkpoint(model, 0)


def test_an_unknown_module_is_checkpointed():
    func = every_nth_checkpoint(torch.nn.Module(), 3, checkpoint=lambda block, *a: ("checkpointed", a))
    assert func(torch.nn.Identity(), 1) == ("checkpointed", (1,))
