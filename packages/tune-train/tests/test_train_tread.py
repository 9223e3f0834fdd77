"""TREAD token routing on small Z-Image and Flux transformers (real diffusers classes, random
weights): plain model at ratio 0 and in eval mode; skipped tokens cross the span unchanged; kept
tokens see exactly their own positions (checked against the unrouted block with the skipped
tokens masked out of attention); gradient checkpointing routes the same tokens; config errors."""

from __future__ import annotations

import pytest
import torch

from tune_models.family import Flavour, LoadedModel, ModelFamily, get_family
from tune_train.config import ConfigError, TrainConfig
from tune_train.tread import TokenRouter, parse_tread_config, resolve_spans

torch.set_num_threads(1)


def _routes(ratio: float, start: int, end: int):
    return parse_tread_config({"routes": [{"selection_ratio": ratio, "start_layer_idx": start, "end_layer_idx": end}]})


# ---------------------------------------------------------------------------- models
def _zimage():
    from diffusers import ZImageTransformer2DModel

    from tune_models.families.zimage.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**{**TINY_TRANSFORMER, "n_layers": 4})
    family = get_family("z-image")
    model = LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer, vae=None,
                        text_encoder=None, tokenizer=None, scheduler=None)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)  # 16 image tokens each
    prompts = {"prompt_embeds": [torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g)]}
    return model, latents, prompts


def _flux():
    from diffusers import FluxTransformer2DModel

    from tune_models.families.flux.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    family = get_family("flux")
    model = LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer, vae=None,
                        text_encoder=None, tokenizer=None, scheduler=None,
                        extras={"guidance": {"mode": "constant", "value": 1.0}})
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    prompts = {"prompt_embeds": torch.randn(2, 6, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    return model, latents, prompts


MODELS = {"z-image": _zimage, "flux": _flux}


def _predict(model, latents, prompts, seed=0):
    torch.manual_seed(seed)  # the router draws its per-call seed here, as the trainer seeds per step
    return model.family.predict(model, latents, torch.tensor([0.3, 0.7]), prompts)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ratio_zero_and_eval_mode_are_the_plain_model(name):
    model, latents, prompts = MODELS[name]()
    transformer = model.transformer.train()
    plain = _predict(model, latents, prompts)
    router = TokenRouter(transformer, model.family.token_routing(model), _routes(0.0, 0, -1))
    assert torch.equal(_predict(model, latents, prompts), plain)
    router.remove()
    router = TokenRouter(transformer, model.family.token_routing(model), _routes(0.5, 1, -1))
    routed = _predict(model, latents, prompts)
    assert router.calls == 1 and not torch.allclose(routed, plain)  # routing changes training forwards
    transformer.eval()
    assert torch.equal(_predict(model, latents, prompts), model.family.predict(model, latents, torch.tensor([0.3, 0.7]), prompts))
    with torch.no_grad():
        evaluated = _predict(model, latents, prompts)
    router.remove()
    with torch.no_grad():
        assert torch.equal(evaluated, _predict(model, latents, prompts))  # eval mode: never routed
    assert router.calls == 1


@pytest.mark.parametrize("name,start", [("z-image", 1), ("z-image", 3), ("flux", 1), ("flux", 2)])
def test_skipped_tokens_cross_unchanged_and_kept_tokens_keep_their_positions(name, start):
    """One-block span: the skipped tokens leave it as they entered; the kept ones equal the
    unrouted block's output when the skipped tokens are hidden from attention (so each kept token
    got its own RoPE position and the text its own)."""
    model, latents, prompts = MODELS[name]()
    transformer = model.transformer.train()
    routing = model.family.token_routing(model)
    block = list(routing.blocks(transformer))[start]
    seen = {}
    # Registered before the router's hooks: sees the block's full input; after: the merged output.
    block.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    router = TokenRouter(transformer, routing, _routes(0.5, start, start))
    block.register_forward_hook(lambda m, a, k, out: seen.update(out=out), with_kwargs=True)
    with torch.no_grad():
        _predict(model, latents, prompts)
    total = router.total
    keep = router.kept(router.spans[0], total, torch.device("cpu"))
    skipped = torch.tensor(sorted(set(range(total)) - set(keep.tolist())))
    assert len(keep) == total // 2 and total == 16
    router.remove()

    call = dict(router._signatures[start].bind(*seen["args"], **seen["kwargs"]).arguments)
    full_in = routing.image_tokens(call, total)
    out = routing.output_image_tokens(seen["out"], total)
    assert torch.equal(out[:, skipped], full_in[:, skipped])
    assert not torch.allclose(out[:, keep], full_in[:, keep])

    # The reference: the same block, unrouted, with the skipped image tokens masked out.
    if name == "z-image":
        length = call["x"].shape[1]
        mask = call["attn_mask"] if call["attn_mask"] is not None else torch.ones(2, length, dtype=torch.bool)
        mask = mask.clone()
        mask[:, skipped] = False
        reference = block(**{**call, "attn_mask": mask})
    else:
        text = call["encoder_hidden_states"].shape[1]
        mask = torch.ones(2, 1, 1, text + total, dtype=torch.bool)
        mask[..., text + skipped] = False
        reference = block(**{**call, "joint_attention_kwargs": {"attention_mask": mask}})
    reference = routing.output_image_tokens(reference, total)
    torch.testing.assert_close(out[:, keep], reference[:, keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_checkpointing_routes_the_same_tokens(name):
    model, latents, prompts = MODELS[name]()
    transformer = model.transformer.train()
    TokenRouter(transformer, model.family.token_routing(model), _routes(0.5, 1, -2))

    def grads():
        transformer.zero_grad(set_to_none=True)
        _predict(model, latents, prompts, seed=4).square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    plain = grads()
    transformer.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


def test_routes_resolve_negative_indices_and_refuse_bad_spans():
    assert [(s.start, s.end) for s in resolve_spans(_routes(0.5, 2, -2), 10)] == [(2, 8)]
    with pytest.raises(ConfigError, match=r"tread_config routes\[0\]: blocks 2..-9 are 2..1"):
        resolve_spans(_routes(0.5, 2, -9), 10)
    two = parse_tread_config({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 4},
                                          {"selection_ratio": 0.3, "start_layer_idx": 4, "end_layer_idx": 6}]})
    with pytest.raises(ConfigError, match="overlap"):
        resolve_spans(two, 10)


@pytest.mark.parametrize("value,message", [
    ({}, 'needs a non-empty "routes" list'),
    ({"routes": [{"selection_ratio": 1.0, "start_layer_idx": 0, "end_layer_idx": 1}]}, r"selection_ratio must be in \[0, 1\)"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": "2", "end_layer_idx": 1}]}, "start_layer_idx must be a whole number"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2}]}, "lacks end_layer_idx"),
    ("{not json", "not valid JSON"),
])
def test_train_config_names_tread_config_in_its_errors(value, message):
    with pytest.raises(ConfigError, match=f"tread_config.*{message}"):
        TrainConfig(model_family="z-image", tread_config=value)


def test_train_config_reads_tread_config_as_json_text():
    config = TrainConfig(model_family="z-image", tread_config='{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}')
    assert config.tread_config["routes"][0]["end_layer_idx"] == -2


def test_a_family_without_token_routing_is_refused_naming_those_with_it():
    from tune_train import tread

    class Plain(ModelFamily):
        name = "plain-dit"

    with pytest.raises(ConfigError, match=r"model_family 'plain-dit' does not support TREAD.*flux.*z-image"):
        tread.check_support(Plain(), {"routes": []})
    tread.check_support(Plain(), None)  # unset: nothing to refuse
    tread.check_support(get_family("flux"), {"routes": []})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_in_tokens_always_go_through_the_span(name):
    """With a loss mask (keep_weighted), the tokens the loss trains on are never routed around;
    the token order matches the family's own packing of the latent grid."""
    model, latents, prompts = MODELS[name]()
    transformer = model.transformer.train()
    routing = model.family.token_routing(model)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 1:3, 0:3] = 1.0  # sample 0: a blob top left; sample 1: one cell bottom right
    mask[1, :, 7, 7] = 0.25
    # Which tokens carry the mask, by the family's own packing of a marked latent.
    marked = mask.expand(2, 16, 8, 8)
    if name == "flux":
        packed = model.family.pack(marked)
    else:
        packed = torch.stack([transformer._patchify_image(m[:, None], 2, 1)[0] for m in marked])
    expected = (packed.abs().sum(-1) > 0).any(0)
    tokens = routing.latent_grid_tokens(mask, 16)
    assert torch.equal(tokens > 0, packed.abs().sum(-1) > 0)

    router = TokenRouter(transformer, routing, _routes(0.75, 1, 1))
    router.keep_weighted(mask)
    with torch.no_grad():
        _predict(model, latents, prompts)
    keep, _ = router._held[0]
    assert set(torch.nonzero(expected).flatten().tolist()) <= set(keep.tolist())
    assert len(keep) == max(4, int(expected.sum()))  # 16 tokens, 75% skip: 4 kept, unless more are masked in
    with torch.no_grad():
        _predict(model, latents, prompts)  # the next forward draws freely again
    assert len(router._held[0][0]) == 4
