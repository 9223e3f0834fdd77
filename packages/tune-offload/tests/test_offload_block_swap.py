"""Block swap: which blocks move, in which order, and that training through it is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tune_offload import OffloadConfigError, OffloadSettings, apply_offload
from tune_offload.block_swap import BlockSwapper, block_swapper, find_blocks
from tune_offload.registry import offload_strategies
from tune_offload.strategies import is_offloaded


class Block(nn.Module):
    """A frozen linear with a trainable low-rank adapter beside it, like a PEFT LoRA layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.base = nn.Linear(width, width)
        self.lora_A = nn.Linear(width, 2, bias=False)
        self.lora_B = nn.Linear(2, width, bias=False)
        self.register_buffer("scale", torch.tensor(0.5))
        for p in (*self.norm.parameters(), *self.base.parameters()):
            p.requires_grad_(False)
        nn.init.normal_(self.lora_B.weight)  # non-zero so its A gets a gradient too

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + torch.nn.functional.gelu(self.base(x) + self.scale * self.lora_B(self.lora_A(x)))


class Model(nn.Module):
    """Transformer-shaped: embedder, refiners and main layers (Z-Image's names), output layer."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, width)
        self.noise_refiner = nn.ModuleList([Block(width)])
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.proj_out = nn.Linear(width, 8)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in [*self.noise_refiner, *self.layers]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.proj_out(h)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in trainable(model).items()}


@pytest.fixture
def plain() -> Model:
    torch.manual_seed(0)
    return Model()


def swap(model: Model, n: int = 2, **kwargs) -> BlockSwapper:
    """A BlockSwapper with a CPU 'accelerator': real bookkeeping, synchronous copies."""
    return BlockSwapper(model, n, onload_device="cpu", use_stream=False, record=True, **kwargs)


def test_blocks_are_found_in_execution_order(plain):
    names = [name for name, _ in find_blocks(plain)]
    assert names == ["noise_refiner.0", "layers.0", "layers.1", "layers.2", "layers.3"]
    assert [n for n, _ in find_blocks(plain, ["layers"])] == names[1:]
    with pytest.raises(ValueError, match="no ModuleList named"):
        find_blocks(plain, ["single_transformer_blocks"])


def test_the_last_n_blocks_are_swapped_and_only_their_frozen_tensors(plain):
    model = copy.deepcopy(plain)
    lora_before = {n: p for n, p in trainable(model).items()}
    swapper = swap(model, 2)
    assert [swapper.block_names[i] for i in swapper.swapped] == ["layers.2", "layers.3"]
    moved = {(type(s.owner).__name__, s.name) for i in swapper.swapped for s in swapper.slots[i]}
    # weight+bias of the base linear and of the norm, plus the buffer; never a LoRA weight
    assert moved == {("Linear", "weight"), ("Linear", "bias"), ("LayerNorm", "weight"),
                     ("LayerNorm", "bias"), ("Block", "scale")}
    assert sum(len(s) for s in swapper.slots.values()) == 2 * 5
    # The trainable parameters are the very same objects (an optimizer may already hold them).
    assert all(lora_before[n] is p for n, p in trainable(model).items())
    # Between calls the swapped slots hold the offloaded tensors.
    for i in swapper.swapped:
        for slot in swapper.slots[i]:
            assert slot.current() is slot.offloaded
    assert block_swapper(model) is swapper and is_offloaded(model) and not is_offloaded(plain)


def test_a_block_runs_on_its_onloaded_copy_and_gives_it_back(plain):
    model = copy.deepcopy(plain)
    swapper = swap(model, 1)
    block = model.layers[3]
    slot = next(s for s in swapper.slots[swapper.swapped[0]] if s.owner is block.base and s.name == "weight")
    seen = []
    block.base.register_forward_pre_hook(lambda m, a: seen.append(m.weight is slot.offloaded))
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert seen == [False]  # a fresh copy on the onload device while it ran
    assert slot.current() is slot.offloaded  # and the offloaded tensor is back afterwards


def test_hook_order_in_inference(plain):
    model = copy.deepcopy(plain)
    swapper = swap(model, 2)  # blocks 3 and 4 of 5
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert swapper.trace == [("prefetch", 3), ("prefetch", 4), ("release", 3), ("release", 4)]
    assert not swapper.resident


def test_hook_order_in_training_with_checkpointing(plain):
    model = copy.deepcopy(plain)
    model.gradient_checkpointing = True
    swapper = swap(model, 2)
    model(torch.randn(2, 8)).square().mean().backward()
    # Forward: block 3 is prefetched while block 2 runs, 4 while 3 runs; 4, the last, stays for
    # backward, which recomputes 4 (prefetching 3), then 3.
    assert swapper.trace == [
        ("prefetch", 3), ("prefetch", 4), ("release", 3),
        ("prefetch", 3), ("release", 4), ("release", 3),
    ]
    assert not swapper.resident


def test_a_swapped_block_keeps_its_weights_in_place_through_its_own_backward(plain):
    """What backward reruns of a block (a checkpointed MLP slice, enable_chunked_feed_forward)
    reads the module's weights again: they must still be the onloaded copies, not the
    offloaded ones, until the block's gradients are done."""
    model = copy.deepcopy(plain)
    swapper = swap(model, 2)
    forward = _offloaded(model)  # reentrant checkpointing: each recomputation runs to its end
    in_place = []
    for index in swapper.swapped:
        slot = swapper.slots[index][0]
        swapper.blocks[index].register_full_backward_hook(
            lambda *_, slot=slot: in_place.append(slot.current() is not slot.offloaded))
    forward(torch.randn(2, 8)).square().mean().backward()
    assert in_place == [True, True]
    assert not swapper.resident  # and all of them are back where they live afterwards


def test_prefetch_depth_two(plain):
    model = copy.deepcopy(plain)
    swapper = swap(model, 3, prefetch=2)
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert swapper.trace[:3] == [("prefetch", 2), ("prefetch", 3), ("prefetch", 4)]
    assert not swapper.resident


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_outputs_and_gradients_match_the_plain_model(plain, checkpointing):
    plain.gradient_checkpointing = checkpointing
    model = copy.deepcopy(plain)
    swap(model, 3)
    for _ in range(2):  # a second step runs through the same hooks
        x = torch.randn(3, 8)
        expected, got = plain(x), model(x)
        torch.testing.assert_close(got, expected)
        expected.square().mean().backward()
        got.square().mean().backward()
        for name, grad in grads(plain).items():
            torch.testing.assert_close(grads(model)[name], grad, msg=name)


def test_torchao_int8_weights_are_taken_apart_and_rebuilt(plain):
    pytest.importorskip("torchao")
    from tune_quant import quantise

    plain.gradient_checkpointing = True
    quantise(plain, "int8-torchao", exclude=["lora_"])
    model = copy.deepcopy(plain)
    swapper = swap(model, 2)
    slot = next(s for s in swapper.slots[4] if s.owner is model.layers[3].base and s.name == "weight")
    assert len(slot.cpu_leaves) >= 2  # int8 data and scales travel as plain tensors
    assert type(slot.offloaded) is type(plain.layers[3].base.weight)
    x = torch.randn(2, 8)
    expected, got = plain(x), model(x)
    torch.testing.assert_close(got, expected)
    expected.sum().backward()
    got.sum().backward()
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(model)[name], grad, msg=name)


def test_a_weight_it_cannot_move_is_a_clear_error(plain):
    class Opaque(nn.Parameter):  # like bitsandbytes' Params4bit: state kept outside the tensor
        pass

    plain.layers[3].base.weight = Opaque(plain.layers[3].base.weight.detach(), requires_grad=False)
    with pytest.raises(OffloadConfigError, match="block swap cannot move a Opaque weight"):
        swap(plain, 1)


def test_remove_restores_the_model(plain):
    model = copy.deepcopy(plain)
    swapper = swap(model, 2)
    swapper.remove()
    assert block_swapper(model) is None
    assert not model.layers[3]._forward_pre_hooks
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), plain(x))


def test_settings_and_registration():
    settings = OffloadSettings.from_config({"--musubi_blocks_to_swap": 15, "musubi_block_swap_device": "cpu"})
    assert settings.strategy == "block_swap" and settings.musubi_blocks_to_swap == 15
    assert "block_swap" in offload_strategies.names()
    with pytest.raises(OffloadConfigError, match="musubi_blocks_to_swap must be >= 0, got -1"):
        OffloadSettings(musubi_blocks_to_swap=-1)
    with pytest.raises(OffloadConfigError, match="musubi_blocks_to_swap and enable_group_offload "
                       "are mutually exclusive"):
        OffloadSettings(musubi_blocks_to_swap=2, enable_group_offload=True)
    assert OffloadSettings().strategy is None
    from tune_offload.activations import offloaded_checkpoint

    assert OffloadSettings().gradient_checkpointing_func() is None
    assert OffloadSettings(offload_checkpointed_activations=True).gradient_checkpointing_func() \
        is offloaded_checkpoint


def test_too_many_blocks_names_the_key(plain):
    with pytest.raises(OffloadConfigError, match="musubi_blocks_to_swap must be between 1 and the "
                       "model's 5 blocks, got 6"):
        swap(plain, 6)


def test_on_a_cpu_run_the_strategy_is_a_no_op(plain, caplog):
    model = copy.deepcopy(plain)
    settings = OffloadSettings(musubi_blocks_to_swap=2)
    with caplog.at_level("WARNING"):
        assert apply_offload(model, settings, onload_device="cpu") is model
    assert "musubi_blocks_to_swap=2 ignored" in caplog.text
    assert block_swapper(model) is None and not model.layers[3]._forward_pre_hooks
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), plain(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["bf16", "int8-torchao"])
def test_block_swap_on_gpu_matches_the_plain_module(preset):
    torch.manual_seed(0)
    plain = Model(width=256, depth=6).to(torch.bfloat16)
    if preset != "bf16":
        pytest.importorskip("torchao")
        from tune_quant import quantise

        quantise(plain, preset, device="cuda", exclude=["lora_"])
    plain.gradient_checkpointing = True
    model = copy.deepcopy(plain)
    plain.cuda()
    apply_offload(model, OffloadSettings(musubi_blocks_to_swap=4), onload_device="cuda")
    swapper = block_swapper(model)
    assert swapper is not None and swapper.use_stream
    slot = swapper.slots[swapper.swapped[0]][0]
    assert slot.offloaded.device.type == "cpu"
    assert all(leaf.is_pinned() for s in swapper.slots[swapper.swapped[0]] for leaf in s.cpu_leaves)
    assert model.proj_in.weight.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in trainable(model).values())
    for _ in range(3):
        x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        expected, got = plain(x), model(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        expected.float().square().mean().backward()
        got.float().square().mean().backward()
        for name, grad in grads(plain).items():
            torch.testing.assert_close(grads(model)[name], grad, rtol=0, atol=0, msg=name)
    torch.cuda.synchronize()
    assert slot.current() is slot.offloaded and not swapper.resident


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stream_ordered", [True, False], ids=["stream-ordered", "side-stream"])
def test_at_most_two_swapped_blocks_are_on_the_gpu_at_once(stream_ordered):
    """The released block's memory feeds the next copy at once (stream-ordered), so a forward and
    a checkpointed backward through 10 swapped blocks never hold a third block's weights; both
    allocation modes give the plain model's gradients."""
    torch.manual_seed(0)
    width = 2048  # 8 MiB of bf16 weight per block: far above the activations of 16 tokens
    plain = Model(width=width, depth=10).to(torch.bfloat16)
    plain.proj_in = nn.Linear(8, width).to(torch.bfloat16)
    plain.gradient_checkpointing = True
    model = copy.deepcopy(plain)
    plain.cuda()
    swapper = BlockSwapper(model, 10, onload_device="cuda", stream_ordered=stream_ordered)
    block_bytes = sum(t.numel() * t.element_size() for s in swapper.slots[swapper.swapped[0]]
                      for t in s.cpu_leaves)
    x = torch.randn(16, 8, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = model(x)
    got.float().square().mean().backward()
    torch.cuda.synchronize()
    in_flight = (torch.cuda.max_memory_allocated() - before) / block_bytes
    expected = plain(x)
    expected.float().square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(model)[name], grad, rtol=0, atol=0, msg=name)
    if stream_ordered:
        assert in_flight < 2.5, f"{in_flight:.2f} blocks' worth of memory in flight"


# ------------------------------------------------------------- offloaded checkpointing
def _offloaded(model: Model, **kwargs):
    from tune_offload.activations import offloaded_checkpoint

    def forward(x):
        h = model.proj_in(x)
        for block in [*model.noise_refiner, *model.layers]:
            h = offloaded_checkpoint(block, h, **kwargs) if torch.is_grad_enabled() else block(h)
        return model.proj_out(h)

    return forward


@pytest.mark.parametrize("with_swap", [False, True], ids=["alone", "with-block-swap"])
def test_offloaded_checkpoint_matches_the_plain_model(plain, with_swap):
    model = copy.deepcopy(plain)
    swapper = swap(model, 2) if with_swap else None
    forward = _offloaded(model)
    for _ in range(2):
        x = torch.randn(3, 8)
        expected, got = plain(x), forward(x)
        torch.testing.assert_close(got, expected)
        expected.square().mean().backward()
        got.square().mean().backward()
        for name, grad in grads(plain).items():
            torch.testing.assert_close(grads(model)[name], grad, msg=name)
    if swapper is not None:  # the recomputation inside backward ran through the swap hooks
        assert ("prefetch", 3) in swapper.trace[4:] and not swapper.resident


def test_offloaded_checkpoint_on_a_diffusers_model_under_autocast():
    from diffusers import ZImageTransformer2DModel

    from tune_offload.activations import offloaded_checkpoint

    torch.manual_seed(0)
    tiny = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                axes_lens=[512, 64, 64])
    plain = ZImageTransformer2DModel(**tiny)
    plain.requires_grad_(False)
    plain.layers[1].feed_forward.w2.weight.requires_grad_(True)
    model = copy.deepcopy(plain)
    plain.enable_gradient_checkpointing()
    model.enable_gradient_checkpointing(offloaded_checkpoint)
    x, caption, t = [torch.randn(16, 1, 8, 8)], [torch.randn(8, 32)], torch.tensor([0.4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x, t, caption, return_dict=False)[0][0]
        got = model(x, t, caption, return_dict=False)[0][0]
    torch.testing.assert_close(got, expected)
    expected.float().sum().backward()
    got.float().sum().backward()
    torch.testing.assert_close(model.layers[1].feed_forward.w2.weight.grad,
                               plain.layers[1].feed_forward.w2.weight.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_checkpoint_with_block_swap_on_gpu():
    torch.manual_seed(0)
    plain = Model(width=256, depth=6).to(torch.bfloat16)
    plain.gradient_checkpointing = True
    model = copy.deepcopy(plain)
    plain.cuda()
    apply_offload(model, OffloadSettings(musubi_blocks_to_swap=3), onload_device="cuda")
    forward = _offloaded(model, min_bytes=0)  # every input goes to the host and back
    for _ in range(2):
        x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        expected, got = plain(x), forward(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        expected.float().square().mean().backward()
        got.float().square().mean().backward()
        for name, grad in grads(plain).items():
            torch.testing.assert_close(grads(model)[name], grad, rtol=0, atol=0, msg=name)
