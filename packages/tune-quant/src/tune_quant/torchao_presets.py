"""torchao presets: weights become torchao tensor subclasses, LoRA trains on top through PEFT.

torchao swaps each selected ``Linear.weight`` for a quantised tensor subclass (``Int8Tensor``,
``Float8Tensor``, ...) without replacing the module, so PEFT still sees ``nn.Linear`` layers and
``state_dict`` keys do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tune_quant.presets import BasePreset, device_problem, log, require, selected_linears

if TYPE_CHECKING:
    import torch

INSTALL = 'pip install "tune-quant[torchao]"'


class TorchAOPreset(BasePreset):
    """One torchao ``quantize_`` configuration with its requirements."""

    def __init__(
        self,
        name: str,
        make_config: Callable[[], Any],
        *,
        cuda_capability: tuple[int, int] | None = None,
        needs: tuple[tuple[str, str], ...] = (),
        group_size: int | None = None,
    ) -> None:
        self.name = name
        self._make_config = make_config
        self._cuda_capability = cuda_capability
        self._needs = needs
        self._group_size = group_size

    def problem(self, device: str) -> str | None:
        missing = require("torchao", INSTALL, self.name)
        if missing:
            return missing
        for import_name, install in self._needs:
            missing = require(import_name, install, self.name)
            if missing:
                return missing
        return device_problem(device, self.name, cuda_capability=self._cuda_capability)

    def _compatible(self, layer: torch.nn.Linear) -> bool:
        return self._group_size is None or layer.in_features % self._group_size == 0

    def apply(self, module: torch.nn.Module, *, exclude: Sequence[str] = ()) -> torch.nn.Module:
        from torchao.quantization import quantize_

        from tune_quant.host_memory import layer_groups, release_free_memory

        chosen = [name for name, _ in selected_linears(module, exclude, self._compatible)]
        if not chosen:
            log.warning("%s: no Linear layer selected for quantisation; module unchanged", self.name)
            return module
        # One block at a time, giving the freed fp32 temporaries back to the OS after each
        # (tune_quant.host_memory): the host's peak stays near the quantised model's size.
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        for group in layer_groups(chosen) if on_cpu else [chosen]:
            names = set(group)
            quantize_(module, self._make_config(), filter_fn=lambda _mod, fqn: fqn in names)
            if on_cpu:
                release_free_memory()
        log.info("%s quantised %d Linear layers", self.name, len(chosen))
        return module

    def pipeline_config(
        self, skeleton: torch.nn.Module, *, dtype: torch.dtype, exclude: Sequence[str] = ()
    ) -> Any:
        """diffusers' ``TorchAoConfig`` quantising, as the weights load, exactly the layers
        :meth:`apply` would (named one by one in a torchao ``FqnToConfig``; others stay as loaded).
        ``skeleton`` is the model built empty, to read the layer names from."""
        from torchao.quantization import FqnToConfig

        from tune_quant.pipeline import diffusers_module

        TorchAoConfig = diffusers_module().TorchAoConfig

        chosen = [name for name, _ in selected_linears(skeleton, exclude, self._compatible)]
        if not chosen:
            log.warning("%s: no Linear layer selected for quantisation; the model loads unchanged", self.name)
        config = self._make_config()
        return TorchAoConfig(FqnToConfig({name: config for name in chosen}))


def _int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _fp8() -> Any:
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _int4() -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)


def _intx4() -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INTX_GROUP_SIZE))


#: Group sizes: a Linear whose ``in_features`` is not a multiple stays unquantised.
INT4_GROUP_SIZE = 128
INTX_GROUP_SIZE = 32

INT8 = TorchAOPreset("int8-torchao", _int8)
FP8 = TorchAOPreset("fp8-torchao", _fp8, cuda_capability=(8, 9))
INT4 = TorchAOPreset(
    "int4-torchao",
    _int4,
    needs=(("mslk", "pip install mslk-cuda (torchao's int4 kernels; CUDA only)"),),
    group_size=INT4_GROUP_SIZE,
)
INT4_WEIGHT_ONLY = TorchAOPreset("int4-weight-only", _intx4, group_size=INTX_GROUP_SIZE)
