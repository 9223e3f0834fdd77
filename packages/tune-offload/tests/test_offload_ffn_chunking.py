"""Feed-forward chunking: same outputs and gradients, less saved for backward, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tune_offload.ffn_chunking import chunk_feed_forward, feed_forward_modules, unchunk_feed_forward

TINY_ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                   axes_lens=[512, 64, 64])


@pytest.fixture(scope="module")
def zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY_ZIMAGE)
    model.requires_grad_(False)
    for block in model.layers:  # stand-ins for LoRA weights inside and outside the MLPs
        block.feed_forward.w1.weight.requires_grad_(True)
        block.attention.to_q.weight.requires_grad_(True)
    return model


def _step(model, *, checkpointing: bool):
    """Loss and gradients of one forward/backward on fixed inputs (64 image + 8 caption tokens)."""
    torch.manual_seed(1)
    x, caption, t = [torch.randn(16, 1, 16, 16)], [torch.randn(8, 32)], torch.tensor([0.3])
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    out = model(x, t, caption, return_dict=False)[0][0]
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_every_token_wise_mlp_is_found(zimage):
    names = [name for name, _ in feed_forward_modules(zimage)]
    assert names == ["noise_refiner.0.feed_forward", "context_refiner.0.feed_forward",
                     "layers.0.feed_forward", "layers.1.feed_forward"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed-blocks"])
def test_outputs_and_gradients_are_unchanged(zimage, checkpointing):
    model = copy.deepcopy(zimage)
    expected, expected_grads = _step(model, checkpointing=checkpointing)
    chunk_feed_forward(model, 7)  # 64 image tokens -> 10 slices, the last one short
    got, got_grads = _step(model, checkpointing=checkpointing)
    torch.testing.assert_close(got, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


def test_only_one_slice_of_hidden_activations_is_saved_for_backward(zimage):
    """What the MLP keeps for backward while gradients are recorded: all its hidden activations
    when plain, only the slices' inputs (views of one tensor) when chunked."""
    ffn = copy.deepcopy(zimage.layers[0].feed_forward)
    x = torch.randn(1, 256, 32, requires_grad=True)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ffn(x).sum().backward()
        return total

    plain = saved_bytes()
    chunk_feed_forward(ffn, 64)
    chunked = saved_bytes()
    hidden = 256 * ffn.w1.out_features * 4  # one fp32 hidden activation of the whole sequence
    assert plain >= 3 * hidden
    assert chunked < hidden, (plain, chunked)


def test_inference_runs_the_plain_mlp(zimage):
    ffn = copy.deepcopy(zimage.layers[0].feed_forward)
    chunk_feed_forward(ffn, 4)
    calls = []
    ffn.w1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        ffn(torch.randn(1, 64, 32))
    assert len(calls) == 1  # one call: not sliced
    ffn(torch.randn(1, 64, 32, requires_grad=True)).sum().backward()
    assert len(calls) == 1 + 16 + 16  # 16 slices, each recomputed once in backward (w1 is needed)


def test_a_deep_copy_chunks_its_own_mlp_and_unchunk_restores(zimage):
    model = copy.deepcopy(zimage)
    chunk_feed_forward(model, 8)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.layers[0].feed_forward.w2.weight.zero_()
    x = torch.randn(1, 32, 32, requires_grad=True)
    assert twin.layers[0].feed_forward(x).abs().sum() == 0  # ran the twin's weights
    assert model.layers[0].feed_forward(x).abs().sum() > 0
    unchunk_feed_forward(model)
    assert all("forward" not in m.__dict__ for _, m in feed_forward_modules(model))


def test_a_model_without_token_wise_mlps_and_a_bad_size_name_the_keys():
    with pytest.raises(ValueError, match="enable_chunked_feed_forward"):
        chunk_feed_forward(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="feed_forward_chunk_size must be >= 1"):
        chunk_feed_forward(nn.Sequential(nn.Linear(4, 4)), 0)
