"""Offloading as a user meets it: same outputs, clear errors for settings that cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tune_offload import OffloadConfigError, OffloadSettings, apply_offload
from tune_offload.strategies import is_group_offloaded
from tune_offload.registry import offload_strategies


class Blocks(nn.Module):
    """A transformer-shaped module: an input layer, a ModuleList of blocks, an output layer."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(h)


@pytest.fixture
def plain() -> Blocks:
    torch.manual_seed(0)
    return Blocks()


@pytest.mark.parametrize(
    "settings",
    [
        OffloadSettings(enable_group_offload=True),
        OffloadSettings(enable_group_offload=True, group_offload_blocks_per_group=3),
        OffloadSettings(enable_group_offload=True, group_offload_type="leaf_level"),
    ],
    ids=["block_level", "block_level-3", "leaf_level"],
)
def test_group_offload_gives_the_same_outputs_and_gradients(plain, settings):
    offloaded = copy.deepcopy(plain)
    assert apply_offload(offloaded, settings, onload_device="cpu") is offloaded
    assert is_group_offloaded(offloaded) and not is_group_offloaded(plain)
    x = torch.randn(4, 8)

    expected = plain(x)
    got = offloaded(x)
    torch.testing.assert_close(got, expected)
    # Training goes through the hooks too: gradients must match the plain module's.
    expected.square().mean().backward()
    got.square().mean().backward()
    torch.testing.assert_close(offloaded.blocks[2][1].weight.grad, plain.blocks[2][1].weight.grad)
    torch.testing.assert_close(offloaded(x), plain(x))  # and a second call still matches


def test_group_offload_to_disk_writes_files_and_matches(plain, tmp_path):
    offloaded = copy.deepcopy(plain)
    folder = tmp_path / "offload"
    settings = OffloadSettings(enable_group_offload=True, group_offload_to_disk_path=str(folder))
    apply_offload(offloaded, settings, onload_device="cpu")
    assert is_group_offloaded(offloaded)
    x = torch.randn(4, 8)
    torch.testing.assert_close(offloaded(x), plain(x))
    assert any(folder.rglob("*.safetensors"))


def test_group_offload_on_a_diffusers_model():
    from diffusers import ModelMixin

    class TinyModel(ModelMixin):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Blocks()

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(2, 8)
    expected = model(x).detach()
    apply_offload(
        model, OffloadSettings(enable_group_offload=True, group_offload_type="leaf_level"),
        onload_device="cpu",
    )
    assert is_group_offloaded(model)
    torch.testing.assert_close(model(x), expected)


def test_nothing_enabled_leaves_the_module_unchanged(plain):
    before = plain._forward_hooks, plain._forward_pre_hooks
    assert apply_offload(plain, OffloadSettings(), onload_device="cpu") is plain
    assert not is_group_offloaded(plain)
    assert (plain._forward_hooks, plain._forward_pre_hooks) == before


def test_group_and_model_cpu_offload_are_mutually_exclusive():
    with pytest.raises(OffloadConfigError, match="enable_group_offload and enable_model_cpu_offload "
                       "are mutually exclusive: "):
        OffloadSettings(enable_group_offload=True, enable_model_cpu_offload=True)


def test_stream_without_an_accelerator_is_refused(plain):
    settings = OffloadSettings(enable_group_offload=True, group_offload_use_stream=True)
    with pytest.raises(OffloadConfigError, match="group_offload_use_stream needs an accelerator"):
        apply_offload(plain, settings, onload_device="cpu")
    assert not is_group_offloaded(plain)


def test_model_cpu_offload_needs_a_pipeline_and_an_accelerator(plain):
    settings = OffloadSettings(enable_model_cpu_offload=True)
    with pytest.raises(OffloadConfigError, match="applies to a diffusers pipeline.*Blocks"):
        apply_offload(plain, settings, onload_device="cuda")

    class FakePipeline:
        def enable_model_cpu_offload(self, device=None):
            raise AssertionError("should have been refused before")

    with pytest.raises(OffloadConfigError, match="needs an accelerator"):
        apply_offload(FakePipeline(), settings, onload_device="cpu")


def test_bad_values_name_the_key():
    with pytest.raises(OffloadConfigError, match="group_offload_type must be one of block_level, "
                       "leaf_level, got 'layer'"):
        OffloadSettings(group_offload_type="layer")
    with pytest.raises(OffloadConfigError, match="group_offload_blocks_per_group must be >= 1, got 0"):
        OffloadSettings(group_offload_blocks_per_group=0)


def test_settings_from_a_simpletuner_config():
    settings = OffloadSettings.from_config(
        {"--enable_group_offload": True, "group_offload_type": "leaf_level", "learning_rate": 1e-4}
    )
    assert settings.enable_group_offload and settings.group_offload_type == "leaf_level"
    assert settings.strategy == "group"


def test_unknown_strategy_lists_the_registered_ones(plain):
    assert {"group", "model_cpu", "block_swap"} <= set(offload_strategies.names())
    with pytest.raises(KeyError, match="unknown offload strategy 'blockswap'.*block_swap.*group"):
        apply_offload(plain, OffloadSettings(), onload_device="cpu", strategy="blockswap")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_offload_with_streams_on_gpu(plain):
    offloaded = copy.deepcopy(plain)
    settings = OffloadSettings(enable_group_offload=True, group_offload_use_stream=True)
    apply_offload(offloaded, settings, onload_device="cuda")
    assert offloaded.blocks[0][1].weight.device.type == "cpu"
    x = torch.randn(4, 8)
    torch.testing.assert_close(offloaded(x.cuda()).cpu(), plain(x))


def test_group_offload_for_training_runs_as_a_backward_safe_strategy(plain, caplog):
    """diffusers' group offload fails in backward on a GPU, so a trained model's
    ``enable_group_offload`` runs as block swap of every block (block_level) or ramtorch
    (leaf_level, or no block lists), with a warning that says so; other settings pass through."""
    with caplog.at_level("WARNING"):
        blocks = OffloadSettings(enable_group_offload=True).for_training(plain)
    assert blocks.strategy == "block_swap" and blocks.musubi_blocks_to_swap == len(plain.blocks)
    assert "runs as block swap of all 4 blocks" in caplog.text
    leaf = OffloadSettings(enable_group_offload=True, group_offload_type="leaf_level").for_training(plain)
    assert leaf.strategy == "ramtorch" and not leaf.enable_group_offload
    assert OffloadSettings(enable_group_offload=True).for_training(nn.Linear(2, 2)).strategy == "ramtorch"
    swap = OffloadSettings(musubi_blocks_to_swap=2)
    assert swap.for_training(plain) is swap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_for_training_trains_on_the_gpu(plain, offload_type):
    """Why ``for_training`` exists: diffusers' group offload itself fails in backward on a GPU
    (the weights autograd saved have moved to the CPU); the strategy standing in gives the plain
    module's gradients, with the frozen weights off the GPU between uses."""
    settings = OffloadSettings(enable_group_offload=True, group_offload_type=offload_type)
    x = torch.randn(4, 8, device="cuda")
    reference = copy.deepcopy(plain).cuda().requires_grad_(False)
    x_ref = x.clone().requires_grad_(True)
    reference(x_ref).square().mean().backward()

    broken = copy.deepcopy(plain).requires_grad_(False)
    apply_offload(broken, settings, onload_device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        broken(x.clone().requires_grad_(True)).square().mean().backward()

    trained = copy.deepcopy(plain).requires_grad_(False)
    apply_offload(trained, settings.for_training(trained), onload_device="cuda")
    x_got = x.clone().requires_grad_(True)
    trained(x_got).square().mean().backward()
    torch.testing.assert_close(x_got.grad, x_ref.grad)
    assert any(p.device.type == "cpu" for p in trained.blocks.parameters()), "nothing was kept off the GPU"
