"""Built-in plugins of tune_offload (registered like any third-party plugin).

Targets are import strings: listing strategies imports neither torch nor diffusers.
"""

from __future__ import annotations

from collections.abc import Callable

from tune_data.plugins import hookimpl


@hookimpl
def tune_register_offload_strategies(register: Callable[..., None]) -> None:
    register(
        "group",
        "tune_offload.strategies:GROUP",
        description="diffusers group offloading (block_level or leaf_level, optional disk/streams)",
    )
    register(
        "block_swap",
        "tune_offload.block_swap:BLOCK_SWAP",
        description="stream the last musubi_blocks_to_swap transformer blocks from pinned CPU "
        "memory for forward and backward (training; CUDA)",
    )
    register(
        "ramtorch",
        "tune_offload.ram_linear:RAMTORCH",
        description="keep frozen linear weights in pinned CPU memory and stream each in per "
        "forward/backward (SimpleTuner's ramtorch options; CUDA)",
    )
    register(
        "model_cpu",
        "tune_offload.strategies:MODEL_CPU",
        description="diffusers model CPU offload for a pipeline (needs an accelerator)",
    )
