"""A LoRA trained through ``tune train`` on a GGUF transformer: same LoRA file layout as from the
bf16 base, a loss curve close to it, and a clear refusal to quantise the GGUF weights again."""

from __future__ import annotations

import pytest
from safetensors import safe_open

pytest.importorskip("gguf")


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_a_lora_trained_on_a_gguf_transformer_exports_like_one_on_the_bf16_base(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    from tune import Trainer
    from tune_models.family import ModelSource, get_family
    from tune_models.testing import write_gguf

    family = get_family("z-image")
    base = family.load(ModelSource(pretrained_model_name_or_path=str(tiny_zimage)), "tiny").transformer
    file = tmp_path / "z_image-Q8_0.gguf"
    write_gguf(base.state_dict(), file)

    common = {"--mixed_precision": "no"}
    plain = Trainer.from_config(write_run(tmp_path / "plain", model=tiny_zimage, data=shapes_dir, steps=4,
                                          extra=common), progress=False).train()
    gguf_config = write_run(tmp_path / "gguf", model=tiny_zimage, data=shapes_dir, steps=4,
                            extra={**common, "--pretrained_transformer_model_name_or_path": str(file)})
    on_gguf = Trainer.from_config(gguf_config, progress=False).train()

    assert _keys(on_gguf.outputs["lora"]) == _keys(plain.outputs["lora"])
    assert on_gguf.losses == pytest.approx(plain.losses, rel=0.05)

    again = write_run(tmp_path / "again", model=tiny_zimage, data=shapes_dir, steps=1,
                      extra={**common, "--pretrained_transformer_model_name_or_path": str(file),
                             "--base_model_precision": "int8-torchao"})
    with pytest.raises(Exception, match="already quantised.*base_model_precision to no_change"):
        Trainer.from_config(again, progress=False).train()
