"""TREAD token routing on small FLUX.2, Qwen-Image, SD3, Chroma, Lumina 2 and Flux Kontext transformers (real diffusers
classes, random weights): ratio 0 is the plain model and routed forwards keep the full token
count; inside a one-block span the kept tokens get exactly what the unrouted block gives when run
on the kept tokens alone with positions computed afresh from their ids (so each one kept its own
RoPE position, text and references theirs) and the skipped ones cross unchanged; gradients reach
the blocks before, inside and after a span, the same with gradient checkpointing; reference
tokens (FLUX.2, Qwen-Image edit, Flux Kontext) are never routed; masked-in tokens follow each family's
packing; block swap composes with routing."""

from __future__ import annotations

import pytest
import torch

from tune_models.family import LoadedModel, get_family
from tune_train.tread import TokenRouter, parse_tread_config

torch.set_num_threads(1)


def _routes(ratio: float, start: int, end: int):
    return parse_tread_config({"routes": [{"selection_ratio": ratio, "start_layer_idx": start, "end_layer_idx": end}]})


def _loaded(name: str, transformer, extras=None) -> LoadedModel:
    family = get_family(name)
    return LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer, vae=None,
                       text_encoder=None, tokenizer=None, scheduler=None, extras=dict(extras or {}))


# ---------------------------------------------------------------------------- models
# Each builder returns (model, latents with 16 image tokens, prompts, reference latents or None).
def _flux2():
    from diffusers import Flux2Transformer2DModel

    from tune_models.families.flux2.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    model = _loaded("flux2", transformer, {"guidance": {"mode": "constant", "value": 1.0}})
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 128, 4, 4, generator=g)  # patch size 1: 16 tokens
    prompts = {"prompt_embeds": torch.randn(2, 6, 48, generator=g)}
    return model, latents, prompts, [torch.randn(2, 128, 2, 3, generator=g)]


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    from tune_models.families.qwen_image.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 4})
    model = _loaded("qwen_image", transformer)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)  # 2x2 patches: 16 tokens
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # the second prompt is shorter: padded, masked
    prompts = {"prompt_embeds": torch.randn(2, 7, 32, generator=g), "prompt_embeds_mask": mask}
    return model, latents, prompts, [torch.randn(2, 16, 4, 6, generator=g)]


def _sd3():
    from diffusers import SD3Transformer2DModel

    from tune_models.families.sd3.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 4, "dual_attention_layers": (0, 1)})
    model = _loaded("sd3", transformer)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    prompts = {"prompt_embeds": torch.randn(2, 6, 64, generator=g), "pooled_prompt_embeds": torch.randn(2, 64, generator=g)}
    return model, latents, prompts, None


def _flux_kontext():
    """Flux.1 with a Kontext reference (Flux.1 without one is covered in test_train_tread.py)."""
    from diffusers import FluxTransformer2DModel

    from tune_models.families.flux.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    model = _loaded("flux", transformer, {"guidance": {"mode": "constant", "value": 1.0}})
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    prompts = {"prompt_embeds": torch.randn(2, 6, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    return model, latents, prompts, [torch.randn(2, 16, 4, 6, generator=g)]


def _chroma():
    from diffusers import ChromaTransformer2DModel

    from tune_models.families.chroma.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    model = _loaded("chroma", transformer)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    prompts = {"prompt_embeds": torch.randn(2, 6, 32, generator=g), "attention_mask": mask}
    return model, latents, prompts, None


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    from tune_models.families.lumina2.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 4})
    model = _loaded("lumina2", transformer)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # captions of 7 and 4 tokens: each sample's image starts elsewhere
    prompts = {"prompt_embeds": torch.randn(2, 7, 32, generator=g), "prompt_attention_mask": mask}
    return model, latents, prompts, None


MODELS = {"flux2": _flux2, "qwen_image": _qwen, "sd3": _sd3, "chroma": _chroma, "flux": _flux_kontext, "lumina2": _lumina2}
SIGMAS = torch.tensor([0.3, 0.7])


def _predict(model, latents, prompts, references=None, seed=0):
    torch.manual_seed(seed)  # the router draws its per-call seed here, as the trainer seeds per step
    kwargs = {"reference_latents": references} if references else {}
    return model.family.predict(model, latents, SIGMAS, prompts, **kwargs)


def _cases():
    for name in sorted(MODELS):
        if name != "flux":
            yield name, False
        if name in ("flux", "flux2", "qwen_image"):
            yield name, True


@pytest.mark.parametrize("name,with_refs", list(_cases()))
def test_ratio_zero_is_the_plain_model_and_routing_keeps_the_token_count(name, with_refs):
    model, latents, prompts, refs = MODELS[name]()
    refs = refs if with_refs else None
    transformer = model.transformer.train()
    plain = _predict(model, latents, prompts, refs)
    router = TokenRouter(transformer, model.family.token_routing(model), _routes(0.0, 0, -1))
    assert torch.equal(_predict(model, latents, prompts, refs), plain)
    router.remove()
    router = TokenRouter(transformer, model.family.token_routing(model), _routes(0.5, 1, -1))
    routed = _predict(model, latents, prompts, refs)
    assert router.calls == 1 and router.total == 16  # only the target's tokens count, never references
    assert routed.shape == plain.shape and torch.isfinite(routed).all()
    assert not torch.allclose(routed, plain)
    transformer.eval()
    with torch.no_grad():
        assert torch.equal(_predict(model, latents, prompts, refs), plain.detach())  # eval: never routed
    assert router.calls == 1


# ---------------------------------------------------------------------------- one-block spans
def _reference_call(name, model, call, keep, total, refs):
    """The block call an unrouted model would make for the kept target tokens alone: positions
    computed from the kept tokens' own ids (not cut from the full ones)."""
    transformer = model.transformer
    family = model.family
    if name == "sd3":
        return {**call, "hidden_states": call["hidden_states"][:, keep]}
    if name == "lumina2":  # per sample: caption, kept image tokens, padding; ids as the rope embedder makes them
        hidden = call["hidden_states"]
        length = hidden.shape[1] - total + len(keep)
        ids = torch.zeros(2, length, 3, dtype=torch.int32)
        rows, cols = keep // 4, keep % 4
        parts, masks = [], torch.zeros(2, length, dtype=torch.bool)
        for b, cap in enumerate((7, 4)):
            ids[b, :cap, 0] = torch.arange(cap, dtype=torch.int32)
            ids[b, cap:cap + len(keep), 0] = cap
            ids[b, cap:cap + len(keep), 1], ids[b, cap:cap + len(keep), 2] = rows.int(), cols.int()
            masks[b, :cap + len(keep)] = True
            parts.append(torch.cat([hidden[b, :cap], hidden[b, cap:cap + total][keep], hidden[b, cap + total:]]))
        return {**call, "hidden_states": torch.stack(parts), "attention_mask": masks,
                "image_rotary_emb": model.transformer.rope_embedder._get_freqs_cis(ids)}
    if name == "qwen_image":
        image_freqs, text_freqs = call["image_rotary_emb"]
        shapes = [(1, 4, 4)] + ([(1, 2, 3)] if refs else [])
        fresh, _ = transformer.pos_embed([shapes], max_txt_seq_len=text_freqs.shape[0], device=image_freqs.device)
        hidden = call["hidden_states"]
        hidden = torch.cat([hidden[:, :total][:, keep], hidden[:, total:]], dim=1)
        return {**call, "hidden_states": hidden,
                "image_rotary_emb": (torch.cat([fresh[:total][keep], fresh[total:]]), text_freqs)}
    text = prompts_len = call["image_rotary_emb"][0].shape[0] - total - (6 if refs else 0)
    if name == "flux2":
        ids = family.image_ids(4, 4, torch.device("cpu"))[keep]
        if refs:
            ids = torch.cat([ids, family.reference_ids([(2, 3)], torch.device("cpu"))])
        ids = torch.cat([family.text_ids(prompts_len, torch.device("cpu")), ids])
    else:  # flux, chroma: (0, row, col) image ids after zero text ids; Kontext's reference at t = 1
        ids = family.image_ids(8, 8, torch.device("cpu"), torch.float32)[keep]
        if refs:
            ref_ids = family.image_ids(4, 6, torch.device("cpu"), torch.float32)
            ref_ids[:, 0] = 1
            ids = torch.cat([ids, ref_ids])
        ids = torch.cat([torch.zeros(prompts_len, 3), ids])
    rope = transformer.pos_embed(ids)
    out = {**call, "image_rotary_emb": rope}
    hidden = call["hidden_states"]
    joint = call.get("encoder_hidden_states") is None
    start = text if joint else 0
    image = hidden[:, start:start + total][:, keep]
    out["hidden_states"] = torch.cat([hidden[:, :start], image, hidden[:, start + total:]], dim=1)
    if call.get("attention_mask") is not None:
        mask = call["attention_mask"]
        out["attention_mask"] = torch.cat([mask[:, :text], mask[:, text:text + total][:, keep]], dim=1)
    return out


SPANS = [("flux2", 1, False), ("flux2", 2, False), ("flux2", 1, True), ("flux2", 3, True),
         ("qwen_image", 1, False), ("qwen_image", 2, True), ("sd3", 1, False), ("sd3", 3, False),
         ("chroma", 0, False), ("chroma", 3, False), ("flux", 1, True), ("flux", 3, True),
         ("lumina2", 1, False), ("lumina2", 3, False)]


@pytest.mark.parametrize("name,start,with_refs", SPANS)
def test_kept_tokens_get_their_own_positions_and_skipped_ones_cross_unchanged(name, start, with_refs):
    """One-block span (a double or a single block): the skipped target tokens leave as they
    entered; the kept ones (and the text and references) equal the unrouted block run on the
    kept tokens alone with freshly computed positions."""
    model, latents, prompts, refs = MODELS[name]()
    refs = refs if with_refs else None
    transformer = model.transformer.train()
    routing = model.family.token_routing(model)
    block = list(routing.blocks(transformer))[start]
    seen = {}
    # Registered before the router's hooks: sees the block's full input; after: the merged output.
    block.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    router = TokenRouter(transformer, routing, _routes(0.5, start, start))
    block.register_forward_hook(lambda m, a, k, out: seen.update(out=out), with_kwargs=True)
    with torch.no_grad():
        _predict(model, latents, prompts, refs)
    total = router.total
    keep = router.kept(router.spans[0], total, torch.device("cpu"))
    skipped = torch.tensor(sorted(set(range(total)) - set(keep.tolist())))
    assert total == 16 and len(keep) == 8
    router.remove()

    call = dict(router._signatures[start].bind(*seen["args"], **seen["kwargs"]).arguments)
    merged = seen["out"]  # before the reference call below runs the spies again
    full_in = routing.image_tokens(call, total)
    out = routing.output_image_tokens(merged, total)
    assert torch.equal(out[:, skipped], full_in[:, skipped])
    assert not torch.allclose(out[:, keep], full_in[:, keep])
    with torch.no_grad():
        reference = block(**_reference_call(name, model, call, keep, total, refs))
    torch.testing.assert_close(out[:, keep], routing.output_image_tokens(reference, len(keep)), rtol=1e-5, atol=1e-5)
    # Everything that is not a target token (text, references) matches too.
    expected = reference
    if name == "lumina2":  # each sample: its caption before the image, its padding after
        for b, cap in enumerate((7, 4)):
            torch.testing.assert_close(merged[b, :cap], expected[b, :cap], rtol=1e-5, atol=1e-5)
        return
    if isinstance(merged, tuple):
        if merged[0] is not None:
            torch.testing.assert_close(merged[0], expected[0], rtol=1e-5, atol=1e-5)
        merged, expected = merged[1], expected[1]
        lead = 0
    else:
        lead = routing.text
    torch.testing.assert_close(merged[:, :lead], expected[:, :lead], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[:, lead + total:], expected[:, lead + len(keep):], rtol=1e-5, atol=1e-5)
    if refs:
        assert merged.shape[1] - lead - total == 6  # the reference's 2 x 3 tokens, all there


@pytest.mark.parametrize("name,with_refs", list(_cases()))
def test_gradients_reach_every_block_and_checkpointing_routes_the_same_tokens(name, with_refs):
    model, latents, prompts, refs = MODELS[name]()
    refs = refs if with_refs else None
    if name == "chroma":
        # diffusers' Chroma drops the attention mask from its single blocks under gradient
        # checkpointing (unrouted too), so checkpointing matches only without text padding.
        prompts["attention_mask"] = torch.ones_like(prompts["attention_mask"])
    transformer = model.transformer.train()
    routing = model.family.token_routing(model)
    TokenRouter(transformer, routing, _routes(0.5, 1, -2))
    blocks = list(routing.blocks(transformer))

    def grads():
        transformer.zero_grad(set_to_none=True)
        _predict(model, latents, prompts, refs, seed=4).square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    plain = grads()
    for block in (blocks[0], blocks[1], blocks[-2], blocks[-1]):  # before, in, and after the span
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    transformer.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_in_tokens_follow_the_family_packing(name):
    """latent_grid_tokens maps a loss mask to the tokens the family's own packing puts it in."""
    model, latents, prompts, _ = MODELS[name]()
    routing = model.family.token_routing(model)
    h, w = latents.shape[-2:]
    mask = torch.zeros(2, 1, h, w)
    mask[0, :, 1:3, 0:3] = 1.0
    mask[1, :, h - 1, w - 1] = 0.25
    marked = mask.expand(2, latents.shape[1], h, w)
    if name == "lumina2":  # the rope embedder's patchify: 2x2 patches in row-major order
        packed = marked.reshape(2, latents.shape[1], h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
    elif name == "sd3":
        # SD3's PatchEmbed: a stride-2 convolution, then row-major tokens.
        ones = torch.ones(1, latents.shape[1], 2, 2)
        packed = torch.nn.functional.conv2d(marked, ones, stride=2).flatten(2).transpose(1, 2)
    else:
        packed = model.family.pack(marked)
    assert torch.equal(routing.latent_grid_tokens(mask, 16) > 0, packed.abs().sum(-1) > 0)


# ---------------------------------------------------------------------------- block swap
def _train_first_block(model):
    """The transformer in training mode with gradient checkpointing, everything frozen but the
    first routable block's linear weights, whose gradients flow back through the routed (and, in
    the tests, swapped) blocks after it. Returns (transformer, those weights)."""
    transformer = model.transformer.train()
    transformer.enable_gradient_checkpointing()
    for p in transformer.parameters():
        p.requires_grad_(False)
    first = model.family.token_routing(model).blocks(transformer)[0]
    trained = [m.weight for m in first.modules() if isinstance(m, torch.nn.Linear)]
    for p in trained:
        p.requires_grad_(True)
    return transformer, trained


@pytest.mark.parametrize("name", ["flux2", "qwen_image"])
def test_block_swap_composes_with_routing(name):
    """musubi block swap (on a CPU "accelerator": synchronous copies, the same hooks) over blocks
    inside a routed span: the swapped blocks still stream in and out, and the gradients equal
    those of the routed model without swapping, with gradient checkpointing on."""
    from tune_offload.block_swap import BlockSwapper

    def grads(swap: bool):
        model, latents, prompts, refs = MODELS[name]()
        transformer, trained = _train_first_block(model)
        # As the trainer: routing installed first, then the transformer is placed (block swap).
        TokenRouter(transformer, model.family.token_routing(model), _routes(0.5, 1, -1))
        swapper = BlockSwapper(transformer, 2, onload_device="cpu", record=True) if swap else None
        _predict(model, latents, prompts, refs, seed=4).square().mean().backward()
        return [p.grad for p in trained if p.grad is not None], swapper

    plain, _ = grads(False)
    swapped, swapper = grads(True)
    events = {event for event, _ in swapper.trace}
    assert "release" in events and events & {"onload", "prefetch"}
    assert {index for _, index in swapper.trace} == set(swapper.swapped)
    assert len(swapped) == len(plain) > 4
    for a, b in zip(swapped, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,with_refs", [("flux2", True), ("qwen_image", True), ("sd3", False), ("chroma", False)])
def test_block_swap_streams_routed_blocks_on_the_gpu(name, with_refs):
    """The real thing: swapped blocks' frozen weights live on the CPU and stream to the GPU on a
    side stream while routed tokens run through them; gradients equal the unswapped routed run."""
    from tune_offload.block_swap import BlockSwapper

    def run(swap: bool):
        model, latents, prompts, refs = MODELS[name]()
        refs = [r.cuda() for r in refs] if with_refs else None
        prompts = {k: v.cuda() for k, v in prompts.items()}
        transformer, trained = _train_first_block(model)
        router = TokenRouter(transformer, model.family.token_routing(model), _routes(0.5, 1, -1))
        swapper = BlockSwapper(transformer, 2, onload_device="cuda", record=True) if swap else None
        if not swap:
            transformer.cuda()
        out = _predict(model, latents.cuda(), prompts, refs, seed=4)
        out.square().mean().backward()
        assert router.calls == 1 and out.shape == latents.shape
        return [p.grad.float().cpu() for p in trained if p.grad is not None], swapper

    plain, _ = run(False)
    swapped, swapper = run(True)
    assert all(p.device.type == "cpu" for i in swapper.swapped for s in swapper.slots[i] for p in [s.offloaded])
    events = {event for event, _ in swapper.trace}
    assert "release" in events and events & {"onload", "prefetch"}
    assert len(swapped) == len(plain) > 4
    for a, b in zip(swapped, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
