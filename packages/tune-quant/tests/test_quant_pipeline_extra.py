"""tune-quant installs without diffusers; only ``quantize_via: pipeline`` needs it, and without it
the error names the extra to install instead of a bare ``No module named 'diffusers'``."""

from __future__ import annotations

import sys

import pytest


def test_pipeline_forms_without_diffusers_name_the_extra(monkeypatch):
    import torch

    from tune_quant.pipeline import config_from_entry, diffusers_module
    from tune_quant.registry import quantisers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "tune-quant\[pipeline\]"'):
        diffusers_module()
    with pytest.raises(ImportError, match=r"tune-quant\[pipeline\]"):
        config_from_entry({"quant_method": "bitsandbytes", "load_in_8bit": True})
    skeleton = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ImportError, match=r"tune-quant\[pipeline\]"):
        quantisers.load("int8-bnb").pipeline_config(skeleton, dtype=torch.bfloat16)


def test_the_pipeline_extra_is_declared():
    from importlib.metadata import requires

    assert any(r.startswith("diffusers") and "extra ==" in r and "pipeline" in r for r in requires("tune-quant") or [])
