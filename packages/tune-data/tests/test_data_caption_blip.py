"""``tune-data caption --captioner blip`` end to end, with a tiny random BLIP built here.

The model and processor are the real transformers classes (``BlipForConditionalGeneration``,
``BlipProcessor`` with a BERT WordPiece tokenizer built in memory), saved to a folder and loaded
by the captioner through ``--model <folder>``: the path a user's local checkpoint takes. Random
weights caption nonsense made of the tiny vocabulary's words, which is all the test needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tune_data.cli import main  # noqa: E402

WORDS = (
    "a an the red blue green yellow circle square triangle on of in white black background small "
    "large photo picture with cat dog"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_blip(folder: Path) -> Path:
    """Save a random BLIP captioner (about 200 kB) and its processor into ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.BertTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = transformers.BlipConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 16,
        },
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
            # Generation starts from [CLS] and stops at [SEP], as the real checkpoints' ids do.
            "bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3, "pad_token_id": 0,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    transformers.BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor_class = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    processor = transformers.BlipProcessor(
        image_processor=image_processor_class(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_caption_a_folder_with_a_tiny_blip_and_resume(tmp_path, capsys):
    model = build_tiny_blip(tmp_path / "tiny-blip")
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (20, 40, 230))):
        Image.new("RGB", (48, 40), colour).save(images / f"{name}.png")

    command = [
        "caption", str(images), "--captioner", "blip", "--model", str(model), "--device", "cpu",
        "--batch-size", "2", "--option", "max_new_tokens=8", "--json", "--no-progress",
    ]
    assert main(command) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["images"], result["captioned"], result["skipped"], result["failed"]) == (3, 3, 0, [])
    captions = {}
    for name in ("red", "green", "blue"):
        text = (images / f"{name}.txt").read_text()
        assert text.endswith("\n") and text.strip()
        words = text.split()
        # Decoded by the saved tokenizer: words of its vocabulary, special tokens stripped.
        assert 1 <= len(words) <= 8 and set(words) <= set(WORDS)
        captions[name] = text
    assert not list(images.glob(".*.tmp"))

    # Resumable: a second run captions nothing; a lost caption is the only one redone.
    assert main(command) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert (again["captioned"], again["skipped"]) == (0, 3)
    (images / "green.txt").unlink()
    assert main(command) == 0
    (third,) = json.loads(capsys.readouterr().out)
    assert (third["captioned"], third["skipped"]) == (1, 2)
    # Greedy decoding of the same weights: the redone caption is the one written before.
    assert (images / "green.txt").read_text() == captions["green"]
    assert (images / "red.txt").read_text() == captions["red"]
