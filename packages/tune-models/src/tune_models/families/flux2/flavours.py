"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`.

Two model lines share the FLUX.2 transformer class, VAE and latent space but not the rest:

- ``dev``: ``Flux2Pipeline``, a Mistral-3 (Mistral Small 3.1, 24 B) text encoder, a guidance
  *embedding* (guidance-distilled).
- ``klein-4b`` / ``klein-9b``: FLUX.2 [klein] **Base** 4B / 9B, ``Flux2KleinPipeline``, a Qwen3
  causal LM (Qwen3-4B / Qwen3-8B) as text encoder, no guidance embedding (the transformer's
  ``guidance_embeds`` is false), and, being neither step- nor guidance-distilled, real
  classifier-free guidance at inference. SimpleTuner maps the same names to the same checkpoints.

Where the klein facts come from:

- checkpoints: BFL's FLUX.2 README (github.com/black-forest-labs/flux2) lists
  ``black-forest-labs/FLUX.2-klein-base-4B`` / ``-base-9B`` as the undistilled "Base" models, the
  ones recommended for fine-tuning and LoRA training (the step-distilled 4-step klein models are
  not flavours here).
- 50 steps, guidance 4: the same README ("Use Base (50-step) for fine-tuning ...") and the defaults
  of ``Flux2KleinPipeline.__call__`` in diffusers 0.42.1 (``num_inference_steps=50``,
  ``guidance_scale=4.0``), whose docstring example runs ``FLUX.2-klein-base-9B`` with exactly those.
  The guidance is CFG against the empty prompt (``Flux2KleinPipeline`` with ``is_distilled``
  false, the base checkpoints' ``model_index.json``), so validation costs two transformer calls a
  step.
- shift ``None`` (resolution-dependent): like dev; the pipeline's own sampler uses BFL's
  ``compute_empirical_mu`` (image tokens and step count), training the scheduler config's curve.
- text encoder layers 9, 18, 27 and 512 tokens: ``Flux2KleinPipeline.encode_prompt``'s defaults
  (``text_encoder_out_layers=(9, 18, 27)``, ``max_sequence_length=512``); dev's are 10, 20, 30.
"""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

FLUX2_FLAVOURS: dict[str, dict[str, Any]] = {
    "dev": flavour_facts(
        "black-forest-labs/FLUX.2-dev", 50, 4.0, None,
        "FLUX.2-dev (32B, Mistral-3 text encoder, guidance-distilled: guidance is an input embedding), auto shift",
    ),
    "klein-4b": flavour_facts(
        "black-forest-labs/FLUX.2-klein-base-4B", 50, 4.0, None,
        "FLUX.2 [klein] Base 4B (Qwen3-4B text encoder, no guidance input, undistilled: real CFG 4 in "
        "validation), auto shift, Apache-2.0",
    ),
    "klein-9b": flavour_facts(
        "black-forest-labs/FLUX.2-klein-base-9B", 50, 4.0, None,
        "FLUX.2 [klein] Base 9B (Qwen3-8B text encoder, no guidance input, undistilled: real CFG 4 in "
        "validation), auto shift, non-commercial licence",
    ),
    "tiny": flavour_facts(
        "tune-tiny:flux2", 2, 4.0, None,
        "random tiny FLUX.2 with the real classes, built locally, for tests",
    ),
    "tiny-klein": flavour_facts(
        "tune-tiny:flux2-klein", 2, 4.0, None,
        "random tiny FLUX.2 [klein] (Flux2KleinPipeline, tiny Qwen3) with the real classes, built locally, for tests",
    ),
}

FLUX2_MODEL_LINES: dict[str, dict[str, Any]] = {
    "dev": {
        "pipeline": "Flux2Pipeline",
        "text_encoder": "Mistral3ForConditionalGeneration",
        "text_encoder_out_layers": (10, 20, 30),
        "max_sequence_length": 512,
        "guidance": "embedded",
    },
    "klein": {
        "pipeline": "Flux2KleinPipeline",
        "text_encoder": "Qwen3ForCausalLM",
        "text_encoder_out_layers": (9, 18, 27),
        "max_sequence_length": 512,
        "guidance": "cfg",
    },
}
"""What differs between FLUX.2 [dev] and FLUX.2 [klein] besides the checkpoint: the diffusers
pipeline class, the transformers text-encoder class, the hidden-state layers stacked into the
prompt embedding (index 0 is the token embeddings), prompt tokens (padded and truncated), and how
guidance works: ``embedded`` (an input of the transformer, guidance-distilled) or ``cfg``
(classifier-free guidance in the pipeline; the transformer has no guidance input)."""

FLUX2_FLAVOUR_LINES: dict[str, dict[str, Any]] = {
    "dev": FLUX2_MODEL_LINES["dev"],
    "klein-4b": FLUX2_MODEL_LINES["klein"],
    "klein-9b": FLUX2_MODEL_LINES["klein"],
    "tiny": {**FLUX2_MODEL_LINES["dev"], "max_sequence_length": 256},
    "tiny-klein": {**FLUX2_MODEL_LINES["klein"], "text_encoder_out_layers": (2, 4, 5), "max_sequence_length": 128},
}
"""Each flavour's model line (:data:`FLUX2_MODEL_LINES`). The tiny ones shrink what a tiny model
must: ``tiny`` pads prompts to 256 tokens (still longer than BFL's system message in its
byte-level tokens); ``tiny-klein``'s 6-layer Qwen3 stacks layers 2, 4 and 5, and its prompts
(no system message) fit 128 byte-level tokens."""

FLUX2_LORA_TARGETS = ["all", "all+ffs", "attention", "full"]

FLUX2_TRAINING_OPTIONS: dict[str, str] = {
    "flux2_guidance_mode": "How the guidance input is set while training: constant (default) or random-range. "
    "dev only: klein has no guidance input, and the key has no effect there (a warning says so).",
    "flux2_guidance_value": "The constant guidance value while training (default 1.0). dev only; no effect on klein.",
    "flux2_guidance_min": "Lowest guidance drawn with random-range (default 1.0). dev only; no effect on klein.",
    "flux2_guidance_max": "Highest guidance drawn with random-range (default 4.0). dev only; no effect on klein.",
}
"""The family's own config keys (passed to ``configure_training``), each with what it does:
registered as ``training_options`` so ``tune check`` and the config reference know them without
importing the family."""
FLUX2_SIMPLETUNER_DEFAULT_FLAVOUR = "klein-9b"
"""SimpleTuner's default flavour, not tune's (see ``ModelFamily.simpletuner_default_flavour``)."""
