"""``tune-data caption`` with tiny random Qwen2.5-VL and Florence-2 models built here.

Both are the real transformers 5 classes (``Qwen2_5_VLForConditionalGeneration``,
``Florence2ForConditionalGeneration``) with tiny configs, saved with their tokenizer and image
processor (built in memory: byte-level vocabularies, no download) into a folder that the built-in
captioners load through ``--model <folder>``, the path a local checkpoint takes. Random weights
caption nonsense; the tests check what a user relies on: every image gets a caption file, a rerun
captions nothing, a lost caption is redone identically (greedy decoding).

The Qwen test also runs without torchvision: transformers 5's Qwen2.5-VL processor wants a video
processor that needs it, and the captioner falls back to an image-only processor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tune_data.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration") or not hasattr(transformers, "Florence2Processor"),
    reason="needs transformers with native Qwen2.5-VL and Florence-2 classes (5.x)",
)


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_tiny_qwen25_vl(folder: Path) -> Path:
    """A random Qwen2.5-VL (~230 kB): 1-layer width-32 language model with M-RoPE, 1-block vision
    tower (14 px patches merged 2x2, images fixed at 56 x 56 = 4 image tokens), a byte-level
    Qwen2 tokenizer with Qwen's chat and vision tokens, and a chat template."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab = {symbol: index for index, symbol in enumerate(byte_alphabet())}
    for token in special:
        vocab[token] = len(vocab)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    token = tokenizer.convert_tokens_to_ids
    ids = dict(bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>"))
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **ids,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
        ),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"), **ids,
    )
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor_class(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    ).save_pretrained(folder)
    return folder


def build_tiny_florence2(folder: Path) -> Path:
    """A random Florence-2 (~360 kB): a 2-stage DaViT vision tower (32 px images -> 4 x 4 + 1 = 17
    image tokens) and a 1+1-layer width-32 BART, with a byte-level BART tokenizer carrying
    ``<image>``. Special tokens cannot win the greedy pick, so the random model writes text."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    vocab = {token: index for index, token in enumerate(special)}
    for symbol in byte_alphabet():
        vocab[symbol] = len(vocab)
    tokenizer = transformers.BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    config = transformers.Florence2Config(
        text_config=dict(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
        ),
        vision_config=dict(
            depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
            embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2], window_size=2, projection_dim=32,
            drop_path_rate=0.0,
        ),
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Florence2ForConditionalGeneration(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[: len(special)] = 0.0  # logit 0 for special tokens
        bias = getattr(model, "final_logits_bias", None)
        if bias is not None:
            bias.zero_()
    model.save_pretrained(folder)
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_class(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17
    transformers.Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def caption_and_resume(tmp_path, capsys, captioner: str, model: Path) -> dict[str, str]:
    images = tmp_path / "images"
    images.mkdir()
    for name, colour, size in (("red", (220, 30, 30), (48, 40)), ("green", (30, 200, 40), (60, 30)),
                               ("blue", (20, 40, 230), (40, 40))):
        Image.new("RGB", size, colour).save(images / f"{name}.png")
    command = [
        "caption", str(images), "--captioner", captioner, "--model", str(model), "--device", "cpu",
        "--batch-size", "2", "--option", "max_new_tokens=6", "--json", "--no-progress",
    ]
    assert main(command) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["images"], result["captioned"], result["skipped"], result["failed"]) == (3, 3, 0, [])
    captions = {name: (images / f"{name}.txt").read_text() for name in ("red", "green", "blue")}
    for text in captions.values():
        assert text.endswith("\n") and text.strip()
    assert not list(images.glob(".*.tmp"))

    assert main(command) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert (again["captioned"], again["skipped"]) == (0, 3)
    (images / "green.txt").unlink()
    assert main(command) == 0
    (third,) = json.loads(capsys.readouterr().out)
    assert (third["captioned"], third["skipped"]) == (1, 2)
    assert (images / "green.txt").read_text() == captions["green"]  # greedy: the same caption again
    return captions


@pytest.mark.slow
def test_caption_a_folder_with_a_tiny_qwen25_vl_and_resume(tmp_path, capsys):
    model = build_tiny_qwen25_vl(tmp_path / "tiny-qwen2.5-vl")
    if importlib.util.find_spec("torchvision") is None:  # the case the image-only processor is for
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            transformers.AutoProcessor.from_pretrained(model)
    caption_and_resume(tmp_path, capsys, "qwen2.5-vl", model)


@pytest.mark.slow
def test_caption_a_folder_with_a_tiny_florence2_and_resume(tmp_path, capsys):
    model = build_tiny_florence2(tmp_path / "tiny-florence2")
    captions = caption_and_resume(tmp_path, capsys, "florence2", model)
    for text in captions.values():  # Florence's task and location tags are stripped
        assert "<" not in text


def test_the_image_only_qwen_processor_takes_the_processor_chat_template(tmp_path):
    # Qwen publishes the vision-aware template as the processor's chat_template.json; the
    # tokenizer's own may lack the image tokens. The fallback processor must use the former.
    from tune_data.captioning import _image_only_qwen_processor

    model = build_tiny_qwen25_vl(tmp_path / "tiny-qwen2.5-vl")
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.json").write_text(json.dumps({"chat_template": "MARK" + template}))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    processor = _image_only_qwen_processor(transformers, str(model), {})
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("MARK<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi")
