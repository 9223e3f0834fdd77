"""bitsandbytes presets: ``nn.Linear`` layers are replaced by ``Linear4bit`` / ``Linear8bitLt``.

Unlike torchao, bitsandbytes quantises through module classes, so this replaces modules in
place (same attribute names, so LoRA target names still match). bitsandbytes quantises when the
new layer is moved to a device; the layer goes back to where the original weight was. These work
on the CPU too; only diffusers' *loading* path (``BitsAndBytesConfig``) insists on a GPU, which is
why tune quantises an already-loaded module instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tune_quant.presets import BasePreset, device_problem, log, require, selected_linears

if TYPE_CHECKING:
    import torch

INSTALL = 'pip install "tune-quant[bnb]"'


def _set_child(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent_name, _, child_name = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


class BnbPreset(BasePreset):
    """Replace each selected Linear with a bitsandbytes layer (``nf4`` 4-bit or int8)."""

    def __init__(self, name: str, kind: str) -> None:
        if kind not in ("nf4", "int8"):
            raise ValueError(f"kind must be 'nf4' or 'int8', got {kind!r}")
        self.name = name
        self.kind = kind

    def problem(self, device: str) -> str | None:
        return require("bitsandbytes", INSTALL, self.name) or device_problem(device, self.name)

    def _replacement(self, layer: torch.nn.Linear) -> torch.nn.Module:
        import bitsandbytes as bnb
        import torch

        has_bias = layer.bias is not None
        weight = layer.weight.detach()
        if self.kind == "nf4":
            new = bnb.nn.Linear4bit(
                layer.in_features, layer.out_features, bias=has_bias,
                compute_dtype=weight.dtype, quant_type="nf4", device="meta",
            )
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(
                layer.in_features, layer.out_features, bias=has_bias,
                has_fp16_weights=False, threshold=6.0, device="meta",
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
        new.train(layer.training)
        return new.to(weight.device)  # bitsandbytes quantises on this move

    def apply(self, module: torch.nn.Module, *, exclude: Sequence[str] = ()) -> torch.nn.Module:
        chosen = list(selected_linears(module, exclude))
        if not chosen:
            log.warning("%s: no Linear layer selected for quantisation; module unchanged", self.name)
        for name, layer in chosen:
            _set_child(module, name, self._replacement(layer))
        log.info("%s replaced %d Linear layers", self.name, len(chosen))
        return module

    def pipeline_problem(self, device: str) -> str | None:
        """diffusers' bitsandbytes loader refuses to run without a GPU (``apply`` does not)."""
        return device_problem(device, f"{self.name} through quantize_via 'pipeline'", cuda_only=True)

    def pipeline_config(
        self, skeleton: torch.nn.Module, *, dtype: torch.dtype, exclude: Sequence[str] = ()
    ) -> Any:
        """diffusers' ``BitsAndBytesConfig`` for this preset, skipping the Linear layers :meth:`apply`
        leaves alone (``llm_int8_skip_modules``, full names). diffusers also matches a skipped
        name against each layer's own short name, so a block's layer called like a skipped
        top-level one (``proj_out``) stays unquantised too."""
        import torch
        from tune_quant.pipeline import diffusers_module

        BitsAndBytesConfig = diffusers_module().BitsAndBytesConfig

        chosen = {name for name, _ in selected_linears(skeleton, exclude)}
        skip = [name for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and name not in chosen]
        if self.kind == "nf4":
            return BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=skip,
            )
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip)


NF4 = BnbPreset("nf4-bnb", "nf4")
INT8 = BnbPreset("int8-bnb", "int8")
