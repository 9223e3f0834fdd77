"""Quantising on the CPU one block at a time, giving freed memory back (tune_quant.host_memory)."""

from __future__ import annotations

import sys

import pytest
import torch

from tune_quant.host_memory import layer_groups, release_free_memory


def test_layers_are_grouped_by_block_in_model_order():
    names = ["embed", "layers.0.attn.q", "layers.0.ff.w1", "layers.1.attn.q", "layers.10.attn.q", "final"]
    assert layer_groups(names) == [["embed"], ["layers.0.attn.q", "layers.0.ff.w1"], ["layers.1.attn.q"],
                                   ["layers.10.attn.q"], ["final"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_memory_is_released_on_linux():
    assert release_free_memory() is True


def test_block_by_block_int8_quantises_every_selected_layer_as_one_call_did():
    pytest.importorskip("torchao")
    from tune_quant import quantise

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)) for _ in range(3)])
    model = model.to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    reference = model(x)
    quantise(model, "int8-torchao", device="cpu")
    kinds = {type(layer.weight).__name__ for layer in model.modules() if isinstance(layer, torch.nn.Linear)}
    assert kinds and "Parameter" not in kinds and "Tensor" not in kinds  # every linear became a subclass
    torch.testing.assert_close(model(x), reference, rtol=0.1, atol=0.05)
