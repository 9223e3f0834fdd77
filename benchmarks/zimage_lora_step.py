"""Z-Image LoRA training step: seconds per step and peak GPU memory for each precision/offload.

A full-size Z-Image transformer (its published ``transformer/config.json``: dim 3840, 30 layers,
2 refiner layers, 30 heads, cap_feat_dim 2560, RoPE axes [32, 48, 48] / [1536, 512, 512]) is
built with random bf16 weights directly on the GPU (speed does not depend on the weights). Each
row trains LoRA rank 16 on the family's ``all`` targets (attention q/k/v/out and the three
feed-forward linears of every block) at 1024 px (128 x 128 latents, 4096 image tokens), batch 1,
cached caption features of ``--caption-len`` tokens (2560 wide, like Qwen3-4B's), gradient
checkpointing, bf16 autocast, fused AdamW, gradient clipping: the step ``tune_train`` runs.

Rows:
  reference        minimal diffusers + peft loop (LoRA weights bf16, transformer called directly)
  bf16             tune's path: tune_models.adapters.add_training_lora (fp32 LoRA weights) and
                   ZImageFamily.predict
  int8-torchao,
  nf4-bnb, ...     tune_quant.quantise(transformer, preset) first, then tune's path
  P+swapN          preset P, then tune_offload block swap of the last N of the 34 blocks
  ...:lora-bf16    LoRA weights (and AdamW states) in bf16 instead of the trainer's fp32
  ...:act-offload  checkpointed block inputs wait in pinned CPU memory
                   (tune_offload.activations.offloaded_checkpoint)
  ...:ffn-chunk[N] each block's MLP runs over checkpointed N-token slices (default 1024;
                   tune_offload.ffn_chunking, enable_chunked_feed_forward)
  ...:side-alloc   block swap allocates its copies on the side stream (the first design)
  ...:tread[R]     TREAD token routing (tread_config): a share R (default 0.5) of the image
                   tokens skips the main layers 2 .. -2 (tune_train.tread)
  P+ramtorch       preset P, frozen linears resident in pinned CPU memory (ramtorch strategy)
  gguf-q8_0,
  gguf-q4_0        the transformer read from a GGUF file in that quantisation (made here with
                   random weights, in parallel; 2-D weights quantised, the rest F32) through
                   tune's .gguf loader (diffusers' GGUF quantiser: each layer dequantises when
                   it runs), then tune's path

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/zimage_lora_step.py \\
      --json zimage_lora_step.json

Data-parallel (DDP, one process per GPU, as ``tune_train`` trains under ``torchrun`` /
``accelerate launch``): launch the same script with torchrun; each rank trains its own batch,
the LoRA gradients are averaged, and rank 0 prints its step time and peak (throughput is
world size / step time):
  torchrun --standalone --nproc_per_node 2 benchmarks/zimage_lora_step.py --rows bf16 --json ddp.json

Peak memory is ``torch.cuda.max_memory_allocated`` over warm-up and timed steps, with the
model, LoRA and optimizer in place (so it includes the weights); the time is the mean of the
timed steps with ``torch.cuda.synchronize`` around each.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
TINY_CONFIG = dict(CONFIG, dim=32, n_layers=4, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                   cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])
"""``--tiny``: the same classes at toy size, to smoke-test this script on a CPU."""
DEVICE = "cuda"
RANK, WORLD_SIZE = 0, 1  # set under torchrun (data-parallel rows)
DEFAULT_ROWS = "reference,bf16,int8-torchao,nf4-bnb,int8-torchao+swap15"
GIB = 1024**3
H100_BF16_TFLOPS = 798.0  # measured dense bf16 matmul rate of the lent H100 (DESIGN.md)


def model_tflop_per_step(caption_len: int, image_tokens: int = 4096) -> float:
    """Model FLOPs of one LoRA step (frozen base): forward + input-gradient backward of every
    linear (4 x MACs... i.e. 2 FLOP/MAC x 2 passes) and attention (forward, 2x in backward).
    Recomputation under checkpointing and the tiny LoRA matmuls are not counted."""
    d, ffn = CONFIG["dim"], int(CONFIG["dim"] / 3 * 8)
    macs_per_token = 4 * d * d + 3 * d * ffn + 256 * 4 * d  # attention, SwiGLU, adaLN
    seq = image_tokens + caption_len
    linear = 4 * macs_per_token * (CONFIG["n_layers"] * seq + 2 * image_tokens + 2 * caption_len)
    attention = 3 * 4 * d * (CONFIG["n_layers"] * seq**2 + 2 * image_tokens**2 + 2 * caption_len**2)
    return (linear + attention) / 1e12


def build_transformer():
    """The published architecture, random bf16 weights, built on the GPU (no slow CPU init)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = ZImageTransformer2DModel(**CONFIG)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # keep activations tame through 34 random blocks
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    return model


def _random_quantised(job: tuple[tuple[int, ...], int, str, bool]):
    """One tensor of the GGUF file: N(0, 0.02) values of ``shape`` (seeded), quantised to
    ``qtype`` when ``quantise`` (in a worker process: gguf's quantisers are numpy, one core each)."""
    import gguf
    import numpy as np

    shape, seed, qtype, quantise = job
    array = np.random.default_rng(seed).normal(0.0, 0.02, shape).astype(np.float32)
    if not quantise:
        return array, None
    kind = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(array, kind), kind


def gguf_transformer(qtype: str):
    """The published architecture from a GGUF file (random weights, 2-D weights in ``qtype``,
    the rest F32, as community conversions store them), loaded the way tune loads a ``.gguf``
    transformer (``tune_models.families._shared.load_transformer``: diffusers' GGUF quantiser,
    dequantising each layer when it runs). The file is written once per ``qtype`` under
    ``$TMPDIR``; its tensors are made and quantised in parallel worker processes."""
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    import gguf
    from diffusers import ZImageTransformer2DModel
    from tune_models.families import _shared
    from tune_models.family import ModelSource

    root = Path(tempfile.gettempdir()) / "tune-bench-zimage"
    file = root / f"z_image-{CONFIG['dim']}x{CONFIG['n_layers']}-{qtype}.gguf"
    with torch.device("meta"):
        skeleton = ZImageTransformer2DModel(**CONFIG)
    skeleton.save_config(root / "transformer")
    if not file.exists():
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]  # values per quantised block
        jobs = [(shape, i, qtype, k.endswith(".weight") and len(shape) == 2 and shape[-1] % block == 0)
                for i, (k, shape) in enumerate(shapes.items())]
        writer = gguf.GGUFWriter(str(file), arch="tune-bench")
        with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            for key, (data, kind) in zip(shapes, pool.map(_random_quantised, jobs, chunksize=4)):
                writer.add_tensor(key, data, raw_dtype=kind) if kind is not None else writer.add_tensor(key, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    model = _shared.load_transformer(
        ZImageTransformer2DModel, ModelSource(pretrained_transformer_model_name_or_path=str(file)), str(root),
        dtype=torch.bfloat16, label="z-image",
    )
    return model.to(DEVICE)


def parse_row(row: str) -> dict:
    """``preset[+swapN|+ramtorch][:lora-bf16][:act-offload][:ffn-chunk[N]][:side-alloc]`` -> the
    row's settings: preset, blocks to swap, ramtorch, LoRA weight dtype, whether checkpointed
    block inputs wait in CPU memory, the MLP chunk size (0 = off), and whether block swap
    allocates its copies on the side stream (the first design) instead of stream-ordered."""
    row, *options = row.split(":")
    chunk, tread = 0, 0.0
    for option in options:
        if option.startswith("ffn-chunk"):
            chunk = int(option[len("ffn-chunk"):] or 1024)
        if option.startswith("tread"):
            tread = float(option[len("tread"):] or 0.5)
    unknown = {o for o in options if not o.startswith(("ffn-chunk", "tread"))} - {"lora-bf16", "act-offload", "side-alloc"}
    if unknown:
        raise ValueError(f"unknown row options {sorted(unknown)} "
                         "(known: lora-bf16, act-offload, ffn-chunk[N], side-alloc, tread[R])")
    ramtorch = row.endswith("+ramtorch")
    preset, _, swap = row.removesuffix("+ramtorch").partition("+swap")
    return dict(preset=preset, blocks_to_swap=int(swap) if swap else 0, ramtorch=ramtorch,
                lora_dtype=torch.bfloat16 if "lora-bf16" in options else torch.float32,
                act_offload="act-offload" in options, ffn_chunk=chunk, tread=tread,
                stream_ordered="side-alloc" not in options)


def setup(row: str):
    """(step function, trainable params, swapper or None) for one row."""
    from tune_models.adapters import add_training_lora
    from tune_models.families.zimage.family import ZImageFamily
    from tune_models.family import LoadedModel

    settings = parse_row(row)
    preset, blocks_to_swap, lora_dtype = settings["preset"], settings["blocks_to_swap"], settings["lora_dtype"]
    act_offload = settings["act_offload"]
    family = ZImageFamily()
    gguf_type = preset.removeprefix("gguf-").upper() if preset.startswith("gguf-") else None
    transformer = gguf_transformer(gguf_type) if gguf_type else build_transformer()
    transformer.requires_grad_(False)
    if preset not in ("reference", "bf16", "no_change") and not gguf_type:
        from tune_quant import quantise

        quantise(transformer, preset, device=DEVICE)
    if act_offload:
        from tune_offload.activations import offloaded_checkpoint

        transformer.enable_gradient_checkpointing(offloaded_checkpoint)
    else:
        transformer.enable_gradient_checkpointing()
    if settings["ffn_chunk"]:
        from tune_offload.ffn_chunking import chunk_feed_forward

        chunk_feed_forward(transformer, settings["ffn_chunk"])
    model = LoadedModel(family=family, flavour=family.flavours[family.default_flavour],
                        transformer=transformer, vae=None, text_encoder=None, tokenizer=None,
                        scheduler=None)
    if preset == "reference":
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights=True,
                                           target_modules=family.lora_target_presets["all"]))
        params = [p for p in transformer.parameters() if p.requires_grad]
    else:
        params = add_training_lora(model, rank=16, alpha=16, target="all", param_dtype=lora_dtype)
    swapper = None
    if blocks_to_swap:
        from tune_offload.block_swap import BlockSwapper

        # What apply_offload(OffloadSettings(musubi_blocks_to_swap=N)) builds, with the
        # allocation mode exposed for the side-alloc comparison rows.
        swapper = BlockSwapper(transformer, blocks_to_swap, onload_device=DEVICE,
                               stream_ordered=settings["stream_ordered"])
    elif settings["ramtorch"]:
        from tune_offload import OffloadSettings, apply_offload

        apply_offload(transformer, OffloadSettings(ramtorch=True), onload_device=DEVICE)
    if settings["tread"]:
        from tune_train import tread

        route = {"selection_ratio": settings["tread"], "start_layer_idx": 2, "end_layer_idx": -2}
        tread.install(model, family, {"routes": [route]})
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=DEVICE == "cuda" or None)
    return model, params, optimizer, swapper, preset


def data_parallel(model):
    """The model with its training forward through DDP, the way ``tune_train`` wraps it
    (frozen tensors ignored, attributes read from the plain module)."""
    import attrs
    from torch.nn.parallel import DistributedDataParallel
    from tune_train.distributed import ignore_frozen_tensors, training_view

    transformer = model.transformer
    ignore_frozen_tensors(transformer)
    ddp = DistributedDataParallel(transformer, device_ids=[torch.cuda.current_device()] if DEVICE == "cuda" else None)
    return attrs.evolve(model, transformer=training_view(ddp, transformer))


def run_row(row: str, args) -> dict:
    t0 = time.perf_counter()
    model, params, optimizer, swapper, preset = setup(row)
    if torch.distributed.is_initialized():
        model = data_parallel(model)
    setup_s = time.perf_counter() - t0
    transformer = model.transformer
    g = torch.Generator(DEVICE).manual_seed(RANK)  # each rank its own batch
    size = args.resolution // 8
    x0 = torch.randn(1, 16, size, size, device=DEVICE, generator=g, dtype=torch.bfloat16)
    noise = torch.randn(x0.shape, device=DEVICE, generator=g, dtype=torch.bfloat16)
    caption = torch.randn(args.caption_len, CONFIG["cap_feat_dim"], device=DEVICE, generator=g,
                          dtype=torch.bfloat16)

    def step() -> float:
        sigma = torch.rand(1, device=DEVICE, generator=g)
        noisy = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if preset == "reference":
                frames = list(noisy.unsqueeze(2).unbind(0))
                out = transformer(frames, 1 - sigma, [caption], return_dict=False)[0]
                pred = -torch.stack(out).squeeze(2)
            else:
                pred = model.family.predict(model, noisy, sigma, {"prompt_embeds": [caption]})
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    cuda = DEVICE == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights_gib = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    result = dict(
        row=row, setup_s=round(setup_s, 1), resident_gib=round(weights_gib, 2),
        peak_gib=round(peak, 2), s_per_step=round(statistics.mean(times), 4),
        s_per_step_median=round(statistics.median(times), 4), step_times=[round(t, 4) for t in times],
        trainable_params=sum(p.numel() for p in params), losses_finite=all(map(math.isfinite, losses)),
    )
    if swapper is not None:
        result["swapped_blocks"] = [swapper.block_names[i] for i in swapper.swapped]
    if preset.startswith("gguf-"):  # how many linears really run from GGUF weights
        result["gguf_linears"] = sum(type(m).__name__ == "GGUFLinear" for m in transformer.modules())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated (default {DEFAULT_ROWS})")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--caption-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip the remaining rows once this many seconds have passed")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="toy-size model on the CPU (smoke test)")
    args = parser.parse_args()
    global DEVICE, RANK, WORLD_SIZE
    if args.tiny:
        DEVICE = "cpu"
        CONFIG.update(TINY_CONFIG)
        args.resolution, args.caption_len = min(args.resolution, 64), min(args.caption_len, 32)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one GPU per process
        RANK, WORLD_SIZE = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if DEVICE == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    began = time.perf_counter()
    results = []
    for row in args.rows.split(","):
        if time.perf_counter() - began > args.budget_s:
            results.append(dict(row=row, error=f"skipped: past the {args.budget_s:.0f} s budget"))
            continue
        try:
            result = run_row(row, args)
        except Exception as exc:  # one broken preset must not hide the others' numbers
            traceback.print_exc()
            result = dict(row=row, error=f"{type(exc).__name__}: {exc}"[:400])
        if RANK == 0:
            print(json.dumps(result), flush=True)
        results.append(result)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return 0
    tflop = model_tflop_per_step(args.caption_len, (args.resolution // 16) ** 2)
    base = next((r["s_per_step"] for r in results if r["row"] == "bf16" and "s_per_step" in r), None)
    for r in results:
        if "s_per_step" in r:
            r["ratio_to_bf16"] = round(r["s_per_step"] / base, 3) if base else None
            r["mfu"] = round(tflop / r["s_per_step"] / H100_BF16_TFLOPS, 3)  # per GPU
            r["images_per_s"] = round(WORLD_SIZE / r["s_per_step"], 3)  # batch 1 per rank
    print()
    print(f"{'preset':<30} {'peak GiB':>9} {'s/step':>8} {'x bf16':>7} {'MFU':>6} {'img/s':>6}  ({WORLD_SIZE} GPU)")
    for r in results:
        if "s_per_step" in r:
            ratio = f"{r['ratio_to_bf16']:.2f}" if r.get("ratio_to_bf16") else "-"
            print(f"{r['row']:<30} {r['peak_gib']:>9.2f} {r['s_per_step']:>8.3f} {ratio:>7} {r['mfu']:>6.1%} {r['images_per_s']:>6.2f}")
        else:
            print(f"{r['row']:<30} {r['error']}")
    meta = dict(
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (--tiny)", torch=torch.__version__, python=platform.python_version(),
        resolution=args.resolution, caption_len=args.caption_len, warmup=args.warmup,
        steps=args.steps, model_tflop_per_step=round(tflop, 1), lora_rank=16,
        lora_targets="ZImageFamily 'all' preset", gradient_checkpointing=True, batch=1,
        config=CONFIG, world_size=WORLD_SIZE,
    )
    for name in ("diffusers", "peft", "torchao", "bitsandbytes"):
        try:
            meta[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed: leave it out
            pass
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
