"""TREAD token routing (``tread_config``): during training, a random share of the image tokens
skips a span of transformer blocks and rejoins, unchanged, after it.

Fewer tokens in the span make its attention and MLPs cheaper; the skipped tokens still carry their
early-layer features (and their gradient) to the blocks after the span, which is what lets the
model keep learning from every position (Krause et al., 2025, "TREAD: Token Routing for Efficient
Architecture-agnostic Diffusion Training"). ``selection_ratio`` is the share that *skips*: 0.5
sends half the image tokens around the span. Text tokens always go through every block.

The mechanism is generic; a family says where its blocks are and how a block call is laid out
through :class:`tune_models.token_routing.TokenRouting` (``ModelFamily.token_routing``). It is
installed as forward hooks, so the model code is untouched:

- a pre-hook on the transformer notes how many image tokens this call has and draws one seed from
  torch's global generator (which the trainer seeds per step, so a resumed run routes the same
  tokens), only while the transformer is in training mode;
- at a route's first block, the kept tokens are gathered (one random subset for the whole batch:
  every sample of a training batch has the same number of tokens) and the full token set is held;
- every block inside the route gets its positional embeddings / attention mask cut to the kept
  tokens (the transformer hands every block the full ones);
- after the route's last block, the processed tokens are written back into the held full set.

Validation and ``eval_loss`` run the transformer in eval mode, so they see the plain model.
With gradient checkpointing a block may run twice (forward and recompute): the subset comes from
the per-call seed, so both runs route the same tokens.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from tune_train.config import ConfigError

__all__ = ["Route", "TokenRouter", "parse_tread_config"]


class TreadConfigError(ConfigError):
    """A malformed ``tread_config``; the message names the key."""


@attrs.frozen
class Route:
    """One routed span, as written in ``tread_config``'s ``routes`` list."""

    selection_ratio: float
    """Share of the image tokens that skip the span, in [0, 1)."""
    start_layer_idx: int
    """First routed block (0-based; negative counts from the end, -1 = the last block)."""
    end_layer_idx: int
    """Last routed block, included (negative counts from the end)."""


def parse_tread_config(value: Any) -> tuple[Route, ...]:
    """The routes of a ``tread_config`` value (a dict, or its JSON text as SimpleTuner's command
    line passes it). Errors name ``tread_config`` and say what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise TreadConfigError(f"tread_config is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping) or not isinstance(value.get("routes"), list) or not value["routes"]:
        raise TreadConfigError(
            'tread_config needs a non-empty "routes" list, e.g. {"routes": [{"selection_ratio": 0.5, '
            '"start_layer_idx": 2, "end_layer_idx": -2}]}'
        )
    routes = []
    for i, entry in enumerate(value["routes"]):
        where = f"tread_config routes[{i}]"
        if not isinstance(entry, Mapping):
            raise TreadConfigError(f"{where} must be an object, got {entry!r}")
        missing = [k for k in ("selection_ratio", "start_layer_idx", "end_layer_idx") if k not in entry]
        if missing:
            raise TreadConfigError(f"{where} lacks {', '.join(missing)}")
        unknown = sorted(set(entry) - {"selection_ratio", "start_layer_idx", "end_layer_idx"})
        if unknown:
            raise TreadConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        ratio, start, end = entry["selection_ratio"], entry["start_layer_idx"], entry["end_layer_idx"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise TreadConfigError(f"{where}: selection_ratio must be in [0, 1), got {ratio!r}")
        for name, index in (("start_layer_idx", start), ("end_layer_idx", end)):
            if isinstance(index, bool) or not isinstance(index, int):
                raise TreadConfigError(f"{where}: {name} must be a whole number, got {index!r}")
        routes.append(Route(float(ratio), start, end))
    return tuple(routes)


@attrs.frozen
class _Span:
    start: int
    end: int
    ratio: float
    number: int


def resolve_spans(routes: Sequence[Route], block_count: int) -> list[_Span]:
    """Routes with absolute, checked block indices (``-1`` = the last block); spans may not
    overlap (a token cannot skip a block twice)."""
    spans = []
    for number, route in enumerate(routes):
        start = route.start_layer_idx + block_count if route.start_layer_idx < 0 else route.start_layer_idx
        end = route.end_layer_idx + block_count if route.end_layer_idx < 0 else route.end_layer_idx
        if not (0 <= start <= end < block_count):
            raise TreadConfigError(
                f"tread_config routes[{number}]: blocks {route.start_layer_idx}..{route.end_layer_idx} are "
                f"{start}..{end} of this transformer's {block_count} routable blocks; need 0 <= start <= end < {block_count}"
            )
        spans.append(_Span(start, end, route.selection_ratio, number))
    spans.sort(key=lambda s: s.start)
    for a, b in zip(spans, spans[1:]):
        if b.start <= a.end:
            raise TreadConfigError(
                f"tread_config routes[{a.number}] (blocks {a.start}..{a.end}) and routes[{b.number}] "
                f"(blocks {b.start}..{b.end}) overlap"
            )
    return spans


class TokenRouter:
    """TREAD routing installed on one transformer (see the module docstring); :meth:`remove` undoes it."""

    def __init__(self, transformer: torch.nn.Module, routing: Any, routes: Sequence[Route]) -> None:
        self.routing = routing
        blocks = list(routing.blocks(transformer))
        self.spans = resolve_spans(routes, len(blocks))
        self._span_of: dict[int, _Span] = {i: s for s in self.spans for i in range(s.start, s.end + 1)}
        self._signatures = {}
        self._handles = [transformer.register_forward_pre_hook(self._begin, with_kwargs=True)]
        for index, block in enumerate(blocks):
            if index in self._span_of:
                self._signatures[index] = inspect.signature(block.forward)
                self._handles.append(block.register_forward_pre_hook(self._pre(index), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._post(index), with_kwargs=True))
        self.active = False
        self.total = 0
        self.seed = 0
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_keep: torch.Tensor | None = None
        self._force: torch.Tensor | None = None
        self.calls = 0
        """Transformer calls that routed tokens (for tests and logs)."""

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def keep_weighted(self, weights: torch.Tensor | None) -> None:
        """For the next training forward only: every image token where ``weights`` (a ``B x 1 x h
        x w`` loss mask on the latent grid) is above 0 for some sample goes through every span, so
        the part of the image the loss trains on is never routed around (as SimpleTuner does with
        masked loss). Fewer tokens then skip: the speed-up shrinks with the masked-in area."""
        self._pending_keep = None if weights is None else weights.detach().cpu()

    def kept(self, span: _Span, total: int, device: torch.device) -> torch.Tensor:
        """The sorted indices of the image tokens that go through ``span`` in this call: the
        forced ones (:meth:`keep_weighted`), then a random draw of the others up to the share."""
        keep_count = max(1, total - int(round(span.ratio * total)))
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + span.number) % (2**63 - 1))
        order = torch.randperm(total, generator=generator)
        if self._force is not None:
            forced = self._force[order]
            # Forced tokens first (in the random order), then the others: a stable sort on "not forced".
            order = order[torch.sort((~forced).to(torch.int8), stable=True).indices]
            keep_count = max(keep_count, int(forced.sum()))
        return order[:keep_count].sort().values.to(device)

    # ------------------------------------------------------------------ hooks
    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.active = module.training and any(s.ratio > 0 for s in self.spans)
        self._held = {}
        pending, self._pending_keep = self._pending_keep, None
        if self.active:
            self.total = self.routing.image_token_count(args, kwargs)
            self.seed = int(torch.randint(0, 2**62, (1,)).item())
            self._force = None
            if pending is not None:
                self._force = (self.routing.latent_grid_tokens(pending, self.total) > 0).any(dim=0)
            self.calls += 1

    def _pre(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            span = self._span_of[index]
            if not self.active or span.ratio == 0:
                return None
            bound = self._signatures[index].bind(*args, **kwargs)
            call = dict(bound.arguments)
            if index == span.start:
                full = self.routing.image_tokens(call, self.total)
                keep = self.kept(span, self.total, full.device)
                self._held[span.number] = (keep, full)
                call = self.routing.with_image_tokens(call, full.index_select(1, keep), self.total)
            keep = self._held[span.number][0]
            return (), self.routing.with_positions(call, keep, self.total)

        return hook

    def _post(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
            span = self._span_of[index]
            if not self.active or span.ratio == 0 or index != span.end:
                return None
            keep, full = self._held[span.number]
            processed = self.routing.output_image_tokens(output, len(keep))
            # The skipped tokens rejoin as they entered the span (out of place, so both the
            # processed and the skipped tokens keep their gradient paths).
            merged = full.index_copy(1, keep, processed.to(full.dtype))
            return self.routing.with_output_image_tokens(output, merged, len(keep))

        return hook


def check_support(family: Any, config_value: Any) -> None:
    """Refuse ``tread_config`` for a family that declares no token routing, before weights load."""
    from tune_models.family import ModelFamily

    if config_value is not None and type(family).token_routing is ModelFamily.token_routing:
        _refuse(family)


def _refuse(family: Any) -> None:
    raise TreadConfigError(
        f"tread_config: model_family {family.name!r} does not support TREAD token routing; "
        f"families that do: {', '.join(supporting_families()) or 'none'}. Remove tread_config."
    )


def install(model: Any, family: Any, config_value: Any) -> TokenRouter | None:
    """Route ``model.transformer``'s tokens as ``tread_config`` says; ``None`` when it is unset.
    A family without :meth:`token_routing` support is refused, naming those that have it."""
    if config_value is None:
        return None
    routes = parse_tread_config(config_value)
    routing = family.token_routing(model)
    if routing is None:
        _refuse(family)
    return TokenRouter(model.transformer, routing, routes)


def supporting_families() -> list[str]:
    """Registered families that override ``ModelFamily.token_routing`` (for the refusal message)."""
    from tune_models.family import ModelFamily
    from tune_models.registry import families_where

    return families_where(lambda family: type(family).token_routing is not ModelFamily.token_routing)
