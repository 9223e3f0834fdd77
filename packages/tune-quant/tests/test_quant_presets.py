"""Quantisation presets as a user meets them: quantise, train a LoRA on top, clear errors."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn

from tune_quant import QuantisationUnavailable, Quantiser, quantise
from tune_quant.presets import default_skip
from tune_quant.registry import quantisers


class TinyDenoiser(nn.Module):
    """Shaped like a transformer: an embedder, a block MLP, a final layer."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(64, 128)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)) for _ in range(2)
        )
        self.norm_out = nn.LayerNorm(128)
        self.proj_out = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(self.norm_out(h))


def _model() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


def _is_quantised(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)


def test_builtin_presets_are_registered():
    assert {
        "no_change", "int8-torchao", "int4-torchao", "int4-weight-only", "fp8-torchao",
        "nf4-bnb", "int8-bnb", "int8-quanto", "fp8-quanto",
    } <= set(quantisers.names())
    for entry in quantisers:
        preset = entry.load()
        assert isinstance(preset, Quantiser) and preset.name == entry.name, entry.name


def test_int8_torchao_quantises_blocks_and_stays_close():
    from torchao.utils import TorchAOBaseTensor

    model = _model()
    x = torch.randn(16, 64)
    reference = model(x).detach()

    assert quantise(model, "int8-torchao", exclude=["blocks.1.2"]) is model

    assert isinstance(model.blocks[0][0].weight, TorchAOBaseTensor)
    assert isinstance(model.blocks[0][2].weight, TorchAOBaseTensor)
    assert isinstance(model.blocks[1][0].weight, TorchAOBaseTensor)
    # The caller's exclusion and the default skips (embedder, final projection) stay fp32.
    for kept in (model.blocks[1][2], model.x_embedder, model.proj_out):
        assert not _is_quantised(kept.weight) and kept.weight.dtype == torch.float32
    out = model(x)
    assert ((out - reference).norm() / reference.norm()).item() < 0.02


def test_lora_trains_on_int8_torchao_base():
    from peft import LoraConfig, inject_adapter_in_model

    model = _model()
    quantise(model, "int8-torchao")
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["blocks.0.0", "blocks.0.2", "blocks.1.0"]),
        model,
    )
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    base = model.blocks[0][0].base_layer.weight
    assert _is_quantised(base)

    torch.manual_seed(1)
    x = torch.randn(32, 64)
    target = torch.randn(32, 64)
    optimiser = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert base.grad is None and model.blocks[0][0].base_layer.weight is base


@pytest.mark.parametrize("preset,tolerance", [("int8-bnb", 0.02), ("nf4-bnb", 0.15)])
def test_bitsandbytes_presets_replace_linears_on_cpu(preset, tolerance):
    bnb = pytest.importorskip("bitsandbytes")

    model = _model()
    x = torch.randn(16, 64)
    reference = model(x).detach()
    quantise(model, preset)
    expected = bnb.nn.Linear8bitLt if preset == "int8-bnb" else bnb.nn.Linear4bit
    assert isinstance(model.blocks[0][0], expected)
    assert type(model.x_embedder) is nn.Linear
    out = model(x)
    assert ((out - reference).norm() / reference.norm()).item() < tolerance


def test_int4_weight_only_works_on_cpu():
    model = _model()
    x = torch.randn(16, 64)
    reference = model(x).detach()
    quantise(model, "int4-weight-only")
    assert _is_quantised(model.blocks[0][0].weight)
    out = model(x)
    assert ((out - reference).norm() / reference.norm()).item() < 0.15


@pytest.mark.parametrize("preset", ["int8-quanto", "fp8-quanto"])
def test_quanto_presets_quantise_blocks_when_installed(preset):
    pytest.importorskip("optimum.quanto", reason='needs pip install "tune-quant[quanto]"')
    model = _model()
    x = torch.randn(16, 64)
    reference = model(x).detach()
    quantise(model, preset)
    assert type(model.blocks[0][0]) is not nn.Linear and type(model.x_embedder) is nn.Linear
    out = model(x)
    assert ((out - reference).norm() / reference.norm()).item() < 0.05


def test_no_change_leaves_the_module_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantise(model, "no_change")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_preset_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown quantiser 'int3-magic'.*int8-torchao.*nf4-bnb"):
        quantise(_model(), "int3-magic")


def test_fp8_on_cpu_names_the_hardware_and_a_preset_that_works():
    model = _model()
    with pytest.raises(QuantisationUnavailable) as info:
        quantise(model, "fp8-torchao", device="cpu")
    message = str(info.value)
    assert "compute capability >= 8.9" in message and "'cpu'" in message
    assert "'int8-torchao'" in message
    assert not _is_quantised(model.blocks[0][0].weight)  # checked before touching weights


def _hide_module(monkeypatch, hidden: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == hidden or name.startswith(hidden + "."):
            raise ImportError(f"No module named {hidden!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    real_import_module = importlib.import_module

    def fake_import_module(name, *args, **kwargs):
        if name == hidden or name.startswith(hidden + "."):
            raise ImportError(f"No module named {hidden!r}")
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import_module)


def test_missing_torchao_names_the_install_command_and_an_alternative(monkeypatch):
    pytest.importorskip("bitsandbytes")
    _hide_module(monkeypatch, "torchao")
    with pytest.raises(QuantisationUnavailable) as info:
        quantise(_model(), "int8-torchao")
    message = str(info.value)
    assert 'pip install "tune-quant[torchao]"' in message
    assert "'int8-bnb'" in message  # bitsandbytes is still here, so it is offered


def test_with_no_quantisation_library_at_all_no_change_is_offered(monkeypatch):
    for library in ("torchao", "bitsandbytes", "optimum"):
        _hide_module(monkeypatch, library)
    with pytest.raises(QuantisationUnavailable) as info:
        quantise(_model(), "int8-torchao")
    assert str(info.value).endswith("A preset that works on 'cpu': 'no_change'.")


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    _hide_module(monkeypatch, "bitsandbytes")
    with pytest.raises(QuantisationUnavailable, match=r'pip install "tune-quant\[bnb\]"'):
        quantise(_model(), "nf4-bnb")


def test_quanto_presets_explain_how_to_install(monkeypatch):
    _hide_module(monkeypatch, "optimum")
    with pytest.raises(QuantisationUnavailable, match=r'pip install "tune-quant\[quanto\]"'):
        quantise(_model(), "int8-quanto")


def test_int4_torchao_without_its_kernels_points_elsewhere(monkeypatch):
    _hide_module(monkeypatch, "mslk")
    with pytest.raises(QuantisationUnavailable, match="mslk.*'int8-torchao'"):
        quantise(_model(), "int4-torchao")


def test_default_skips_only_top_level_sensitive_layers():
    assert default_skip("time_text_embed.linear_1")
    assert default_skip("norm_out.linear")
    assert default_skip("proj_out")
    assert default_skip("all_final_layer.2-1.linear")
    assert default_skip("blocks.0.attn.to_q.lora_A.default")
    assert not default_skip("single_transformer_blocks.0.proj_out")
    assert not default_skip("transformer_blocks.0.attn.to_q")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,tolerance", [
    ("int8-torchao", 0.03), ("fp8-torchao", 0.1), ("int4-weight-only", 0.15),
])
def test_torchao_presets_on_gpu_train_a_lora(preset, tolerance):
    from peft import LoraConfig, inject_adapter_in_model

    if preset == "fp8-torchao" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9")
    model = _model().to("cuda", torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    reference = model(x).float()
    quantise(model, preset, device="cuda")
    assert _is_quantised(model.blocks[0][0].weight)
    assert ((model(x).float() - reference).norm() / reference.norm()).item() < tolerance

    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["blocks.0.0", "blocks.1.2"]), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # train the adapter in fp32, as the trainer does
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=1e-2)
    target = torch.randn(32, 64, device="cuda")
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
