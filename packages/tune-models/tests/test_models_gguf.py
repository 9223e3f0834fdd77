"""GGUF transformer checkpoints: a ``.gguf`` file given as the transformer loads through diffusers'
GGUF quantiser (weights stay quantised, each layer dequantises when it runs), and a LoRA trains on
top of it with the same keys as on a bf16 base.

The file is written by ``tune_models.testing.write_gguf`` (Q8_0 linear weights, the rest F32), the
way community GGUF conversions of diffusion transformers are laid out.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tune_models.family import ModelSource, compute_dtype
from tune_models.testing import write_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(zimage, tiny_path, tmp_path_factory):
    base = zimage.load(ModelSource(pretrained_model_name_or_path=str(tiny_path)), "tiny").transformer
    path = tmp_path_factory.mktemp("gguf") / "z_image_turbo-Q8_0.gguf"
    assert write_gguf(base.state_dict(), path) > 20
    return path, base


def _load(zimage, tiny_path, file):
    return zimage.load(
        ModelSource(pretrained_model_name_or_path=str(tiny_path), pretrained_transformer_model_name_or_path=str(file)),
        "tiny",
    )


def test_a_gguf_transformer_keeps_quantised_weights_that_dequantise_to_the_checkpoint(zimage, tiny_path, gguf_file):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    file, base = gguf_file
    model = _load(zimage, tiny_path, file)
    ffn = model.transformer.layers[0].feed_forward.w1
    assert isinstance(ffn, GGUFLinear) and isinstance(ffn.weight, GGUFParameter)
    assert ffn.weight.dtype == torch.uint8 and model.dtype == torch.float32 == compute_dtype(model.transformer)
    expected = base.layers[0].feed_forward.w1.weight
    error = (dequantize_gguf_tensor(ffn.weight).float() - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.01  # Q8_0: quantised, and close
    # The rest of the model is the base checkpoint's.
    torch.testing.assert_close(model.transformer.x_pad_token, base.x_pad_token)


def test_a_lora_trains_on_a_gguf_base_with_the_keys_of_a_bf16_base(zimage, tiny_path, gguf_file):
    from tune_models.adapters import add_training_lora

    file, _ = gguf_file
    losses, keys = [], []
    for transformer_file in (file, None):
        model = _load(zimage, tiny_path, transformer_file) if transformer_file else zimage.load(
            ModelSource(pretrained_model_name_or_path=str(tiny_path)), "tiny")
        params = add_training_lora(model, rank=4, alpha=4, target="all")
        keys.append(sorted(n for n, p in model.transformer.named_parameters() if p.requires_grad))
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        x0 = torch.randn(1, 16, 8, 8, generator=generator)
        noise = torch.randn(1, 16, 8, 8, generator=generator)
        caption = {"prompt_embeds": [torch.randn(8, 32, generator=generator)]}
        sigma = torch.tensor([0.5])
        run = []
        for _ in range(5):
            pred = zimage.predict(model, (1 - sigma) * x0 + sigma * noise, sigma, caption)
            loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    gguf_losses, plain_losses = losses
    assert gguf_losses[-1] < gguf_losses[0]  # it trains
    assert gguf_losses == pytest.approx(plain_losses, rel=0.05)  # like the unquantised base
    assert keys[0] == keys[1]


def test_without_the_gguf_package_the_error_names_the_install(zimage, tiny_path, gguf_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r'pip install "tune-models\[gguf\]"'):
        _load(zimage, tiny_path, gguf_file[0])
