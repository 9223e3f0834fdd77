"""What ``use_ema`` costs a full fine-tune per update, for each place the EMA can live.

A full fine-tune's EMA is an fp32 copy of every weight. This times one ``EMA.step`` (and one
``swapped_in`` round trip, what EMA validation pays) over bf16 weights of SDXL's UNet size
(2.57 B parameters, in tensors of the UNet's typical sizes; the update cost depends on the total
size and the tensor count, not on the architecture), for:

- ``ema_device: cpu`` (the default): the shadow lives on the CPU and visits the GPU for each update;
- ``ema_device: accelerator``: the shadow lives on the GPU;
- ``ema_cpu_only``: the update runs on the CPU, the weights visit it;

and ``ema_device: cpu`` once more with the whole EMA moved at once (``CHUNK_BYTES`` unbounded),
as updates were before they went a chunk at a time.

Needs a CUDA GPU and only torch plus ``tune_train.ema`` (run with
``PYTHONPATH=packages/tune-train/src python3 benchmarks/ema_full_update.py``). Prints one JSON
line per mode: seconds per update, per swap, and the GPU memory the EMA adds.
"""

from __future__ import annotations

import json
import time

import torch

import tune_train.ema as ema_module
from tune_train.ema import EMA

#: SDXL UNet size: 2,567,463,684 parameters in 1,680 tensors; modelled as 1,680 tensors of that total.
TOTAL, COUNT = 2_567_463_684, 1_680


def _params(device: torch.device) -> list[torch.nn.Parameter]:
    sizes = [TOTAL // COUNT] * COUNT
    return [torch.nn.Parameter(torch.randn(n, device=device, dtype=torch.bfloat16) * 0.02) for n in sizes]


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    device = torch.device("cuda")
    params = _params(device)
    print(json.dumps({"device": torch.cuda.get_device_name(), "parameters": sum(p.numel() for p in params)}))
    modes = {
        "ema_device cpu (default)": dict(storage_device="cpu", update_on_storage=False),
        "ema_device accelerator": dict(storage_device=device, update_on_storage=False),
        "ema_cpu_only": dict(storage_device="cpu", update_on_storage=True),
        "ema_device cpu, all at once": dict(storage_device="cpu", update_on_storage=False),
    }
    chunk = ema_module.CHUNK_BYTES
    for name, kwargs in modes.items():
        ema_module.CHUNK_BYTES = 2**62 if name.endswith("all at once") else chunk
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ema = EMA(params, decay=0.999, **kwargs)
        resident = torch.cuda.memory_allocated() - before
        step = _time(lambda: ema.step(1), 3)
        peak = torch.cuda.max_memory_allocated() - before

        def swap() -> None:
            with ema.swapped_in():
                pass

        swapped = _time(swap, 2)
        print(json.dumps({
            "mode": name, "update_s": round(step, 3), "swap_s": round(swapped, 3),
            "gpu_gib_resident": round(resident / 2**30, 2), "gpu_gib_peak_during_update": round(peak / 2**30, 2),
        }))
        del ema, swap


if __name__ == "__main__":
    main()
