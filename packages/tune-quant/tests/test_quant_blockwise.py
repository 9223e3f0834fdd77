"""``quantize_via: accelerator``: block-by-block quantisation gives the whole-module result, and
the device only ever holds the resident part plus one unquantised block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tune_quant import quantise, quantise_blockwise
from tune_quant.blockwise import BLOCK_LIST_NAMES, block_lists


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Named like Flux's per-block modulation: inside a block it *is* quantised, although a
        # top-level "norm..." child is not. Per-block quantisation must keep that distinction.
        self.norm1 = nn.Module()
        self.norm1.linear = nn.Linear(64, 64)
        self.ff = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ff(h * (1 + self.norm1.linear(h)))


class TwoListDenoiser(nn.Module):
    """Flux-shaped: double blocks then single blocks, plus resident layers outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(32, 64)  # default skip (embedder)
        self.context_proj = nn.Linear(64, 64)  # quantised, resident
        self.transformer_blocks = nn.ModuleList(Block() for _ in range(2))
        self.single_transformer_blocks = nn.ModuleList(Block() for _ in range(3))
        self.norm_out = nn.LayerNorm(64)
        self.proj_out = nn.Linear(64, 32)  # default skip (output projection)
        self.pad_token = nn.Parameter(torch.zeros(64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.context_proj(self.x_embedder(x)) + self.pad_token
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            h = block(h)
        return self.proj_out(self.norm_out(h))


def _model() -> TwoListDenoiser:
    torch.manual_seed(0)
    return TwoListDenoiser()


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a (possibly quantised subclass) weight."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(t, name))]
    return [t.detach()]


def _quantised(module: nn.Module) -> dict[str, type]:
    return {name: type(m.weight) for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) not in (torch.Tensor, nn.Parameter)}


def test_blockwise_equals_whole_module_quantisation():
    pytest.importorskip("torchao")
    whole, blockwise = _model(), _model()
    quantise(whole, "int8-torchao")
    quantise_blockwise(blockwise, "int8-torchao", device="cpu", offload_last=2)

    assert _quantised(blockwise) == _quantised(whole)
    assert "transformer_blocks.0.norm1.linear" in _quantised(whole)  # a nested "norm" name
    assert "context_proj" in _quantised(whole) and "proj_out" not in _quantised(whole)
    for (name, a), (_, b) in zip(whole.state_dict().items(), blockwise.state_dict().items()):
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            assert torch.equal(x, y), name
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(whole(x), blockwise(x))


def test_blockwise_honours_exclude_like_quantise():
    pytest.importorskip("torchao")
    whole, blockwise = _model(), _model()
    quantise(whole, "int8-torchao", exclude=("ff.2", "single_transformer_blocks.1."))
    quantise_blockwise(blockwise, "int8-torchao", device="cpu", exclude=("ff.2", "single_transformer_blocks.1."))
    assert _quantised(blockwise) == _quantised(whole)
    assert not any(n.startswith("single_transformer_blocks.1.") or n.endswith("ff.2") for n in _quantised(whole))


class _Recorder:
    """A stand-in preset that records which layers it is asked to quantise, and a log of moves.

    The "device" is a fake: every ``.to`` is recorded (and runs on the CPU), so the test can
    replay where each block would be at each moment.
    """

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def check(self, device: str) -> None:
        self.events.append(("check", device))

    def apply(self, module: nn.Module, *, exclude=()) -> nn.Module:
        linears = sorted(n for n, m in module.named_modules() if isinstance(m, nn.Linear))
        self.events.append(("apply", *linears))
        return module


def _spy_moves(model: nn.Module, recorder: _Recorder) -> None:
    for name, child in [*model.named_children(),
                        *[(f"{ln}.{i}", b) for ln in ("transformer_blocks", "single_transformer_blocks")
                          for i, b in enumerate(getattr(model, ln))]]:
        if isinstance(child, nn.ModuleList):
            continue
        original = child.to

        def to(device, *args, _name=name, _original=original, **kwargs):
            recorder.events.append(("to", _name, str(device)))
            return _original("cpu")

        child.to = to


def test_order_and_placement_with_a_fake_device(monkeypatch):
    from tune_quant.registry import quantisers

    recorder = _Recorder()
    monkeypatch.setattr(quantisers, "load", lambda name: recorder)
    model = _model()
    _spy_moves(model, recorder)
    quantise_blockwise(model, "recorder", device="meta", offload_last=2, offload_device="cpu",
                       keep_on_cpu=lambda i: i == 0)

    events = recorder.events
    assert events[0] == ("check", "meta")  # before any weight moves
    # The part outside the blocks goes first and stays; its apply sees full dotted names.
    rest = [e for e in events[1:] if e[0] == "to" and "blocks" not in e[1]]
    assert {e[1] for e in rest} == {"x_embedder", "context_proj", "norm_out", "proj_out"}
    assert all(e[2] == "meta" for e in rest)
    assert events[len(rest) + 1] == ("apply", "context_proj", "proj_out", "x_embedder")
    block_events = events[len(rest) + 2:]
    expected = []
    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(3)]
    for index, name in enumerate(names):
        expected.append(("to", name, "meta"))
        expected.append(("apply", f"{name}.ff.0", f"{name}.ff.2", f"{name}.norm1.linear"))
        if index == 0 or index >= 3:  # keep_on_cpu(0), and the last two (offload_last=2)
            expected.append(("to", name, "cpu"))
    assert block_events == expected

    # Replay: at each apply, at most one not-yet-quantised block is on the device.
    on_device, done = set(), set()
    for event in block_events:
        if event[0] == "to":
            (on_device.add if event[2] == "meta" else on_device.discard)(event[1])
        else:
            block = event[1].rsplit(".", 2)[0]
            assert on_device - done == {block}
            done.add(block)
    assert on_device == {"transformer_blocks.1", "single_transformer_blocks.0"}


def test_offload_last_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"musubi_blocks_to_swap.*5 blocks, got 6"):
        quantise_blockwise(_model(), "no_change", device="cpu", offload_last=6)


def test_block_list_names_match_tune_offload():
    """"The last N blocks" must mean the same blocks to quantisation and to block swap."""
    block_swap = pytest.importorskip("tune_offload.block_swap")
    assert BLOCK_LIST_NAMES == block_swap.BLOCK_LIST_NAMES
    model = _model()
    ours = [f"{n}.{i}" for n in block_lists(model) for i in range(len(getattr(model, n)))]
    assert ours == [name for name, _ in block_swap.find_blocks(model)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blockwise_on_cuda_leaves_swapped_blocks_on_the_cpu():
    pytest.importorskip("torchao")
    model, reference = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    quantise_blockwise(model, "int8-torchao", device="cuda", offload_last=2)
    devices = {name: p.device.type for name, p in model.named_parameters()}
    assert all(d == "cpu" for n, d in devices.items() if n.startswith(("single_transformer_blocks.1.", "single_transformer_blocks.2.")))
    assert all(d == "cuda" for n, d in devices.items() if not n.startswith(("single_transformer_blocks.1.", "single_transformer_blocks.2.")))
    quantise(reference.cuda(), "int8-torchao", device="cuda")
    x = torch.randn(2, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model.cuda()(x), reference(x))
