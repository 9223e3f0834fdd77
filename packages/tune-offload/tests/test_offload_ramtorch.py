"""CPU-resident linears (the ``ramtorch`` strategy): selection, bookkeeping, gradients, settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tune_offload import OffloadConfigError, OffloadSettings, apply_offload
from tune_offload.ram_linear import CpuResidentLinears, ram_linears, select_linears
from tune_offload.registry import offload_strategies
from tune_offload.strategies import is_offloaded


class Block(nn.Module):
    """A frozen linear with a trainable LoRA beside it, like PEFT's ``lora.Linear``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.base = nn.Linear(width, width)
        self.ff = nn.Linear(width, width, bias=False)
        self.lora_A = nn.Linear(width, 2, bias=False)
        self.lora_B = nn.Linear(2, width, bias=False)
        for p in (*self.norm.parameters(), *self.base.parameters(), *self.ff.parameters()):
            p.requires_grad_(False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + self.ff(torch.nn.functional.gelu(self.base(x) + self.lora_B(self.lora_A(x))))


class Model(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, width)
        self.transformer_blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.proj_out = nn.Linear(width, 8)
        self.proj_in.requires_grad_(False)
        self.proj_out.requires_grad_(False)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.proj_out(h)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def plain() -> Model:
    torch.manual_seed(0)
    return Model()


def install(model: nn.Module, target=None, percent: float = 100.0) -> CpuResidentLinears:
    """Resident linears with a CPU 'accelerator': real bookkeeping, synchronous copies."""
    return CpuResidentLinears(model, select_linears(model, target, percent), onload_device="cpu")


def names(model, target=None, percent=100.0):
    return [n for n, _ in select_linears(model, target, percent)]


def test_only_frozen_linears_are_chosen_in_module_order(plain):
    assert names(plain) == ["proj_in", *[f"transformer_blocks.{i}.{k}" for i in range(3)
                                         for k in ("base", "ff")], "proj_out"]
    # the trainable LoRA linears never leave the device
    assert not any("lora" in n for n in names(plain))


def test_target_modules_globs_follow_simpletuner(plain):
    assert names(plain, "transformer_blocks.1.*") == ["transformer_blocks.1.base", "transformer_blocks.1.ff"]
    # a name without a wildcard means everything under it
    assert names(plain, "transformer_blocks.1") == names(plain, "transformer_blocks.1.*")
    assert names(plain, "proj_*, transformer_blocks.2.ff") == ["proj_in", "transformer_blocks.2.ff", "proj_out"]
    assert names(plain, ["Linear"]) == names(plain)  # class names match too
    assert names(plain, " , ") == names(plain)  # empty patterns mean no restriction


def test_percent_takes_the_first_share_rounded_up(plain):
    assert names(plain, percent=0) == []
    assert names(plain, percent=25) == ["proj_in", "transformer_blocks.0.base"]  # ceil(8 * 0.25)
    assert names(plain, "transformer_blocks.*", 50) == [
        "transformer_blocks.0.base", "transformer_blocks.0.ff", "transformer_blocks.1.base"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_outputs_and_gradients_match_the_plain_model(plain, checkpointing):
    plain.gradient_checkpointing = checkpointing
    model = copy.deepcopy(plain)
    resident = install(model)
    assert ram_linears(model) is resident and is_offloaded(model)
    x = torch.randn(4, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    expected, got = plain(x), model(x2)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    assert grads(model).keys() == grads(plain).keys() and grads(plain)
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(model)[name], grad, msg=name)
    torch.testing.assert_close(x2.grad, x.grad)
    # no frozen weight gets a gradient
    assert all(r.linear.weight.grad is None for r in resident.residents)


def test_each_layer_is_copied_once_per_forward_and_once_per_backward(plain):
    model = copy.deepcopy(plain)
    resident = install(model)
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert resident.transfers == 8
    model(torch.randn(2, 8)).sum().backward()
    # the inputs of proj_in and of the first block's base need no grad (frozen layers before
    # any LoRA): no autograd node, no backward copy
    assert resident.transfers == 8 + 8 + 6
    per_layer = {r.name: r.transfers for r in resident.residents}
    assert per_layer["proj_in"] == per_layer["transformer_blocks.0.base"] == 2
    assert per_layer["transformer_blocks.0.ff"] == per_layer["proj_out"] == 3


def test_peft_lora_trains_on_top_of_cpu_resident_base_layers():
    peft = pytest.importorskip("peft")

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k, self.to_out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.to_out(torch.softmax(self.to_q(x) @ self.to_k(x).transpose(-1, -2), -1) @ x)

    torch.manual_seed(0)
    plain = nn.Sequential(Attention(), nn.GELU(), Attention()).requires_grad_(False)
    plain = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["to_q", "to_out"], init_lora_weights="gaussian"), plain)
    model = copy.deepcopy(plain)
    resident = install(model)
    chosen = [r.name for r in resident.residents]
    assert "0.to_q.base_layer" in chosen and "0.to_k" in chosen
    assert not any("lora" in name for name in chosen)
    x = torch.randn(2, 5, 16)
    expected, got = plain(x), model(x)
    torch.testing.assert_close(got, expected)
    expected.square().mean().backward()
    got.square().mean().backward()
    assert len(grads(plain)) == 8  # lora_A/B of four targets
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(model)[name], grad, msg=name)
    assert peft.get_peft_model_state_dict(model).keys() == peft.get_peft_model_state_dict(plain).keys()


def test_weights_stay_in_their_cpu_slot_and_state_dict_keys_do_not_change(plain):
    model = copy.deepcopy(plain)
    resident = install(model, "transformer_blocks.0.*")
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert resident.cpu_bytes() == (16 * 16 + 16 + 16 * 16) * 4
    weight = model.transformer_blocks[0].base.weight
    model(torch.randn(2, 8)).sum().backward()
    assert model.transformer_blocks[0].base.weight is weight  # the device copy was dropped
    assert isinstance(model.transformer_blocks[0].base, nn.Linear)


def test_a_deep_copy_streams_its_own_weights(plain):
    model = copy.deepcopy(plain)
    resident = install(model)
    twin = copy.deepcopy(model)
    assert ram_linears(twin) is not resident and ram_linears(twin).module is twin
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    x = torch.randn(2, 8)
    assert model(x).abs().max() == 0
    torch.testing.assert_close(twin(x), plain(x))
    assert ram_linears(twin).transfers == 8 and resident.transfers == 8


def test_remove_restores_the_model(plain):
    model = copy.deepcopy(plain)
    resident = install(model)
    resident.remove()
    assert ram_linears(model) is None and not is_offloaded(model)
    assert "forward" not in model.proj_in.__dict__
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), plain(x))


def test_torchao_int8_weights_travel_and_give_the_same_gradients(plain):
    pytest.importorskip("torchao")
    from tune_quant import quantise

    quantise(plain, "int8-torchao", exclude=["lora_"])
    model = copy.deepcopy(plain)
    resident = install(model)
    base = next(r for r in resident.residents if r.name == "transformer_blocks.1.base")
    assert base.quantised and len(base.parts["weight"][1]) >= 2
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

    plain.proj_out.weight = Opaque(plain.proj_out.weight.detach(), requires_grad=False)
    with pytest.raises(OffloadConfigError, match="ramtorch cannot keep proj_out.weight.*"
                       "ramtorch_target_modules"):
        install(plain)


def test_settings_name_the_users_keys():
    settings = OffloadSettings.from_config({"--ramtorch": True, "ramtorch_target_modules": "layers.*",
                                            "ramtorch_transformer_percent": 40})
    assert settings.strategy == "ramtorch" and settings.ramtorch_transformer_percent == 40
    assert "ramtorch" in offload_strategies.names()
    with pytest.raises(OffloadConfigError, match="ramtorch_transformer_percent must be between 0 and 100, got 150"):
        OffloadSettings(ramtorch=True, ramtorch_transformer_percent=150)
    with pytest.raises(OffloadConfigError, match="ramtorch and enable_group_offload are mutually exclusive"):
        OffloadSettings(ramtorch=True, enable_group_offload=True)
    with pytest.raises(OffloadConfigError, match="ramtorch and musubi_blocks_to_swap are mutually exclusive"):
        OffloadSettings(ramtorch=True, musubi_blocks_to_swap=2)


def test_train_config_takes_the_keys():
    from tune_train.config import ConfigError, TrainConfig

    config = TrainConfig(model_family="z-image", ramtorch=True, ramtorch_target_modules="layers.*",
                         ramtorch_transformer_percent=50)
    settings = config.offload_settings()
    assert settings.strategy == "ramtorch" and settings.ramtorch_target_modules == "layers.*"
    with pytest.raises(ConfigError, match="ramtorch_transformer_percent must be between 0 and 100, got -1"):
        TrainConfig(model_family="z-image", ramtorch_transformer_percent=-1)
    with pytest.raises((ConfigError, OffloadConfigError), match="ramtorch and musubi_blocks_to_swap"):
        TrainConfig(model_family="z-image", ramtorch=True, musubi_blocks_to_swap=2)


def test_on_a_cpu_run_the_strategy_is_a_no_op(plain, caplog):
    model = copy.deepcopy(plain)
    with caplog.at_level("WARNING"):
        assert apply_offload(model, OffloadSettings(ramtorch=True), onload_device="cpu") is model
    assert "ramtorch ignored" in caplog.text and ram_linears(model) is None


def test_a_non_cuda_accelerator_is_refused(plain):
    with pytest.raises(OffloadConfigError, match="ramtorch needs a CUDA device.*set ramtorch to false"):
        apply_offload(plain, OffloadSettings(ramtorch=True), onload_device="meta")
    with pytest.raises(OffloadConfigError, match="ramtorch streams weights on CUDA streams.*'mps'"):
        OffloadSettings(ramtorch=True).check_device("mps")
    OffloadSettings(ramtorch=True).check_device("cpu")  # a logged no-op later, not an error


def test_no_match_names_the_key(plain):
    from tune_offload.ram_linear import RAMTORCH

    with pytest.raises(OffloadConfigError, match="ramtorch_target_modules='nothing.*'"):
        RAMTORCH.choose(plain, OffloadSettings(ramtorch=True, ramtorch_target_modules="nothing.*"))
    assert RAMTORCH.choose(plain, OffloadSettings(ramtorch=True, ramtorch_transformer_percent=0)) == []
    chosen = RAMTORCH.choose(plain, OffloadSettings(ramtorch=True, ramtorch_target_modules="proj_out"))
    assert [name for name, _ in chosen] == ["proj_out"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["bf16", "int8-torchao"])
def test_ramtorch_on_gpu_matches_the_plain_module(preset):
    torch.manual_seed(0)
    plain = Model(width=256, depth=4).to(torch.bfloat16)
    if preset != "bf16":
        pytest.importorskip("torchao")
        from tune_quant import quantise

        quantise(plain, preset, device="cuda", exclude=["lora_"])
    model = copy.deepcopy(plain)
    plain.cuda()
    apply_offload(model, OffloadSettings(ramtorch=True, ramtorch_transformer_percent=75), onload_device="cuda")
    resident = ram_linears(model)
    assert len(resident.residents) == 8  # ceil(10 * 0.75)
    for r in resident.residents:
        assert all(leaf.device.type == "cpu" and leaf.is_pinned() for _, leaves in r.parts.values() for leaf in leaves)
    assert model.transformer_blocks[0].lora_A.weight.device.type == "cuda"
    assert model.transformer_blocks[3].ff.weight.device.type == "cuda"  # beyond the 75 %
    x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    expected, got = plain(x), model(x)
    torch.testing.assert_close(got, expected)
    expected.float().square().sum().backward()
    got.float().square().sum().backward()
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(model)[name], grad, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_already_on_the_gpu_gives_its_linear_weights_back():
    """ramtorch on a model placed on the GPU first (as quantize_via accelerator does) frees the
    chosen linears' GPU weights: only the CPU copies are kept, and remove() rebuilds them."""
    torch.manual_seed(0)
    model = Model(width=1024, depth=4).to(torch.bfloat16).cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    apply_offload(model, OffloadSettings(ramtorch=True), onload_device="cuda")
    torch.cuda.synchronize()
    chosen = sum(r.linear.weight.numel() * 2 for r in ram_linears(model).residents)
    assert before - torch.cuda.memory_allocated() > 0.9 * chosen
    ram_linears(model).remove()
    assert model.transformer_blocks[0].ff.weight.device.type == "cuda"
