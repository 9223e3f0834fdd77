"""Built-in optimizers and learning-rate schedules, registered through the plugin hooks.

Each builder takes the trainable parameters (or the optimizer) and the typed ``TrainConfig``; a
third-party plugin registers its own builders the same way, by name. Optimizers come from their
maintained libraries (bitsandbytes, torchao, optimi, prodigyopt, ...), imported only when chosen;
a missing one is an :class:`ImportError` carrying the install command.

``optimizer_config`` (``"d_coef=2,safeguard_warmup=true"``) is parsed into keyword arguments that
override the defaults each builder derives from ``optimizer_beta1/2``, ``adam_weight_decay`` and
``adam_epsilon``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

OPTIMIZERS_EXTRA = 'pip install "tune-train[optimizers]"'


def lr_scale_factor(config: Any, num_processes: int) -> float:
    """What ``lr_scale`` multiplies the learning rates by: processes x ``gradient_accumulation_steps``
    x ``train_batch_size`` (its square root with ``lr_scale_sqrt``); 1 without ``lr_scale``."""
    if not config.lr_scale:
        return 1.0
    product = num_processes * config.gradient_accumulation_steps * config.train_batch_size
    return math.sqrt(product) if config.lr_scale_sqrt else float(product)


def scaled_learning_rates(config: Any, num_processes: int) -> Any:
    """``config`` with ``learning_rate`` and ``text_encoder_lr`` (when set) multiplied by
    :func:`lr_scale_factor`: what the optimizer and schedule builders get. ``lr_end`` keeps its
    value (the schedules read it against the scaled ``learning_rate``)."""
    import attrs

    scale = lr_scale_factor(config, num_processes)
    if scale == 1.0:
        return config
    text_encoder_lr = config.text_encoder_lr * scale if config.text_encoder_lr is not None else None
    return attrs.evolve(config, learning_rate=config.learning_rate * scale, text_encoder_lr=text_encoder_lr)


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """``"a=1,b=true,c=(0.9, 0.99),d=name"`` → ``{"a": 1, "b": True, "c": (0.9, 0.99), "d": "name"}``.

    Values are Python literals where they parse as one (numbers, tuples), ``true``/``false``/``none``
    in any case, and strings otherwise. Commas inside brackets do not split.
    """
    from tune_train.config import ConfigError

    out: dict[str, Any] = {}
    if not text or not text.strip():
        return out
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in parts:
        if not part.strip():
            continue
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"optimizer_config must be key=value pairs separated by commas; got {part.strip()!r}")
        word = raw.lower()
        if word in ("true", "false"):
            out[key] = word == "true"
        elif word in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
    return out


def _require(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this optimizer needs {module.split('.')[0]!r}, which is not installed: {install}") from exc


def first_param(params: Sequence[Any]) -> torch.Tensor | None:
    """The first parameter of a list of parameters or of parameter groups (``{"params": [...]}``,
    as the trainer passes with ``train_text_encoder``), for device checks; None when empty."""
    for item in params:
        if isinstance(item, dict):
            found = first_param(list(item["params"]))
            if found is not None:
                return found
        else:
            return item
    return None


def _make(cls: Any, params: Iterable[torch.nn.Parameter], learning_rate: float, config: Any, **defaults: Any):
    kwargs = defaults | parse_optimizer_config(getattr(config, "optimizer_config", None))
    try:
        return cls(list(params), lr=learning_rate, **kwargs)
    except TypeError as exc:
        raise TypeError(f"optimizer {config.optimizer!r} ({cls.__name__}): {exc} (check optimizer_config)") from exc


def _adam_defaults(config: Any) -> dict[str, Any]:
    return {
        "betas": config.optimizer_betas(),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }


def build_adamw(params: Iterable[torch.nn.Parameter], learning_rate: float, config: Any) -> torch.optim.Optimizer:
    """torch's AdamW; ``fused`` on CUDA (faster, same maths), ``foreach`` elsewhere."""
    params = list(params)
    first = first_param(params)
    on_cuda = first is not None and first.is_cuda
    return _make(torch.optim.AdamW, params, learning_rate, config, **_adam_defaults(config), fused=on_cuda or None)


def build_adamw_bf16(params, learning_rate: float, config: Any):
    """optimi's AdamW with Kahan summation: bf16 weights keep the small updates bf16 would round away.

    optimi runs eagerly (foreach) on any device; torchao's ``_AdamW(bf16_stochastic_round=True)``
    does the same job but goes through ``torch.compile`` on every device, which costs tens of seconds
    of compilation on a CPU. The trainer keeps the LoRA weights in bf16 for this optimizer
    (``param_dtype``), which is where the memory saving comes from.
    """
    optimi = _require("optimi", OPTIMIZERS_EXTRA)
    return _make(optimi.AdamW, params, learning_rate, config, **_adam_defaults(config), kahan_sum=True)


build_adamw_bf16.param_dtype = torch.bfloat16  # type: ignore[attr-defined]


def _bnb(name: str):
    def build(params, learning_rate: float, config: Any):
        bnb = _require("bitsandbytes.optim", 'pip install "tune-quant[bnb]"')
        defaults = _adam_defaults(config)
        if "Lion" in name:
            defaults.pop("eps")
        return _make(getattr(bnb, name), params, learning_rate, config, **defaults)

    build.__doc__ = f"bitsandbytes' ``{name}``: optimizer state in 8 bits (tensors of 4096+ elements)."
    return build


build_bnb_adamw8bit = _bnb("AdamW8bit")
build_bnb_lion8bit = _bnb("Lion8bit")
build_bnb_paged_adamw8bit = _bnb("PagedAdamW8bit")


def _torchao(name: str, min_capability: tuple[int, int] | None = None):
    def build(params, learning_rate: float, config: Any):
        params = list(params)
        first = first_param(params)
        if min_capability and first is not None and first.is_cuda:
            capability = torch.cuda.get_device_capability(first.device)
            if capability < min_capability:
                raise RuntimeError(
                    f"optimizer {config.optimizer!r} needs a GPU with FP8 support (CUDA compute capability "
                    f"{min_capability[0]}.{min_capability[1]}+, e.g. Ada or Hopper); this one is "
                    f"{capability[0]}.{capability[1]}. Use ao-adamw8bit instead."
                )
        ao = _require("torchao.optim", 'pip install "tune-quant[torchao]"')
        return _make(getattr(ao, name), params, learning_rate, config, **_adam_defaults(config))

    build.__doc__ = f"torchao's ``{name}`` (quantised state; compiled with torch.compile on first step)."
    return build


build_ao_adamw8bit = _torchao("AdamW8bit")
build_ao_adamw4bit = _torchao("AdamW4bit")
build_ao_adamfp8 = _torchao("AdamFp8", min_capability=(8, 9))


def build_prodigy(params, learning_rate: float, config: Any):
    """Prodigy (prodigyopt): estimates the step size itself; use ``learning_rate`` 1.0."""
    prodigyopt = _require("prodigyopt", OPTIMIZERS_EXTRA)
    return _make(prodigyopt.Prodigy, params, learning_rate, config, **_adam_defaults(config))


def build_lion(params, learning_rate: float, config: Any):
    """Lion (lion-pytorch): sign updates; use a learning rate 3-10x lower than AdamW's."""
    lion = _require("lion_pytorch", OPTIMIZERS_EXTRA)
    defaults = _adam_defaults(config)
    defaults.pop("eps")
    return _make(lion.Lion, params, learning_rate, config, **defaults)


def build_adamw_schedulefree(params, learning_rate: float, config: Any):
    """Schedule-free AdamW (schedulefree). Its weights for evaluation differ from those it trains:
    the trainer switches it to ``eval()`` for validation and exports, and back to ``train()``."""
    schedulefree = _require("schedulefree", OPTIMIZERS_EXTRA)
    optimizer = _make(
        schedulefree.AdamWScheduleFree, params, learning_rate, config,
        **_adam_defaults(config), warmup_steps=config.lr_warmup_steps,
    )
    optimizer.train()
    return optimizer


@contextlib.contextmanager
def evaluation_weights(optimizer: Any, trainable: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """The weights to evaluate and export: schedule-free optimizers train one point (``y``) and
    evaluate another (``x``); ``eval()`` moves the parameters there. The trained values are
    restored exactly afterwards (``train()`` alone would round-trip them through float maths
    and a checkpointed run would drift from an uninterrupted one). Other optimizers: a no-op."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if not (hasattr(inner, "eval") and hasattr(inner, "train") and "train_mode" in inner.param_groups[0]):
        yield
        return
    saved = [p.detach().clone() for p in trainable]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, value in zip(trainable, saved):
                p.copy_(value)


def build_came(params, learning_rate: float, config: Any):
    """CAME (came-pytorch): confidence-guided Adafactor-like memory use; three betas, two eps."""
    came = _require("came_pytorch", OPTIMIZERS_EXTRA)
    beta1, beta2 = config.optimizer_betas()
    return _make(
        came.CAME, params, learning_rate, config,
        betas=(beta1, beta2, 0.9999), eps=(1e-30, 1e-16), weight_decay=config.adam_weight_decay,
    )


def build_soap(params, learning_rate: float, config: Any):
    """SOAP (pytorch-optimizer): Adam in Shampoo's eigenbasis."""
    po = _require("pytorch_optimizer", OPTIMIZERS_EXTRA)
    return _make(po.SOAP, params, learning_rate, config, **_adam_defaults(config))


# ------------------------------------------------------------------------------------ schedules


def _lambda_scheduler(optimizer: torch.optim.Optimizer, fn) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """0 → 1 over the steps after warm-up, clamped."""
    span = max(1, total_steps - warmup_steps)
    return min(1.0, max(0.0, (step - warmup_steps) / span))


def build_constant(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """The learning rate stays at ``learning_rate`` (``lr_warmup_steps`` is ignored, as in SimpleTuner)."""
    return _lambda_scheduler(optimizer, lambda step: 1.0)


def build_constant_with_warmup(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Linear warm-up over ``lr_warmup_steps``, then constant."""
    warmup = config.lr_warmup_steps
    return _lambda_scheduler(optimizer, lambda step: warmup_factor(step, warmup))


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warm-up, then half a cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup_steps, total_steps)))


def build_cosine(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Linear warm-up over ``lr_warmup_steps``, then cosine decay to 0 at the last step."""
    warmup = config.lr_warmup_steps
    return _lambda_scheduler(optimizer, lambda step: cosine_factor(step, warmup, total_steps))


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warm-up, then a straight line from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    return 1.0 - _progress(step, warmup_steps, total_steps)


def build_linear(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Linear warm-up, then linear decay to 0 at the last step."""
    warmup = config.lr_warmup_steps
    return _lambda_scheduler(optimizer, lambda step: linear_factor(step, warmup, total_steps))


def cosine_restarts_factor(step: int, warmup_steps: int, total_steps: int, cycles: int) -> float:
    """Warm-up, then ``cycles`` cosine decays from 1 to 0, each restarting at 1 (hard restarts)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = _progress(step, warmup_steps, total_steps)
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def build_cosine_with_restarts(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Warm-up, then ``lr_num_cycles`` cosine decays with hard restarts."""
    warmup, cycles = config.lr_warmup_steps, config.lr_num_cycles
    return _lambda_scheduler(optimizer, lambda step: cosine_restarts_factor(step, warmup, total_steps, cycles))


def polynomial_factor(step: int, warmup_steps: int, total_steps: int, power: float, end_ratio: float) -> float:
    """Warm-up, then ``end + (1 - end) * (1 - progress) ** power`` (``end`` = lr_end / learning_rate)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = _progress(step, warmup_steps, total_steps)
    return end_ratio + (1.0 - end_ratio) * (1.0 - progress) ** power


def build_polynomial(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Warm-up, then polynomial decay (``lr_power``) from ``learning_rate`` to ``lr_end``."""
    warmup, power = config.lr_warmup_steps, config.lr_power
    end_ratio = config.lr_end / config.learning_rate
    return _lambda_scheduler(optimizer, lambda step: polynomial_factor(step, warmup, total_steps, power, end_ratio))


def sine_factor(step: int, warmup_steps: int, total_steps: int, cycles: int, end_ratio: float) -> float:
    """Warm-up, then a sine wave between 1 and ``end`` with ``cycles`` full periods, starting at 1."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = _progress(step, warmup_steps, total_steps)
    wave = 0.5 * (1.0 + math.sin(2.0 * math.pi * cycles * progress + math.pi / 2))
    return end_ratio + (1.0 - end_ratio) * wave


def build_sine(optimizer: torch.optim.Optimizer, config: Any, total_steps: int):
    """Warm-up, then the learning rate oscillates between ``learning_rate`` and ``lr_end``,
    ``lr_num_cycles`` periods over the run."""
    warmup, cycles = config.lr_warmup_steps, config.lr_num_cycles
    end_ratio = config.lr_end / config.learning_rate
    return _lambda_scheduler(optimizer, lambda step: sine_factor(step, warmup, total_steps, cycles, end_ratio))
