"""The trainer turns cuDNN attention off on CUDA for a family whose training step crashes in it
(Flux.1, Chroma), and leaves it alone for the others and on the CPU."""

from __future__ import annotations

import pytest
import torch

from tune_models.family import get_family
from tune_train.setup_model import choose_attention_backends


@pytest.fixture
def cudnn_sdp():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("name, turned_off", [("flux", True), ("chroma", True), ("z-image", False),
                                              ("qwen-image", False), ("sd3", False)])
def test_cudnn_attention_is_off_only_for_the_families_that_crash_in_it(cudnn_sdp, name, turned_off):
    family = get_family(name)
    assert family.cudnn_attention_in_training is not turned_off
    assert choose_attention_backends(family, torch.device("cuda")) is turned_off
    assert torch.backends.cuda.cudnn_sdp_enabled() is not turned_off


def test_nothing_changes_on_the_cpu(cudnn_sdp):
    assert choose_attention_backends(get_family("flux"), torch.device("cpu")) is False
    assert torch.backends.cuda.cudnn_sdp_enabled()
