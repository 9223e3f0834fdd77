"""Loading SimpleTuner configs (tune.config), the check plan (tune.plan), and the generated reference."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tune.config import ConfigError, LoadedConfig, ignored_options, load_config, simpletuner_options
from tune.plan import build_plan, format_plan
from tune_data.plugins import Registration

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tests" / "fixtures" / "zimage_quickstart"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory, so nothing resolves against the repository by accident."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENV", raising=False)
    return tmp_path


def write_project(root: Path, config: dict, *, images: dict[str, tuple[int, int]] | None = None, where="config.json"):
    """A config.json at ``root/where`` with one image dataset (``root/data``) and a text-embeds one."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, size in (images if images is not None else {"a red fox.png": (64, 64)}).items():
        Image.new("RGB", size, (200, 80, 40)).save(data / name)
    backend = [
        {"id": "pics", "type": "local", "instance_data_dir": str(data), "caption_strategy": "filename"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache/text")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(backend))
    path = root / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_family": "z-image", "data_backend_config": str(root / "multidatabackend.json"), **config}))
    return path


# -- finding config.json ---------------------------------------------------------------------------


def test_missing_config_lists_the_places_looked(workdir):
    with pytest.raises(ConfigError) as info:
        load_config(workdir)
    message = str(info.value)
    assert "no config file found" in message
    assert str(workdir / "config.json") in message and str(workdir / "config" / "config.json") in message


def test_directory_finds_config_subfolder(workdir):
    write_project(workdir, {"lora_rank": 4}, where="config/config.json")
    loaded = load_config(workdir)
    assert loaded.config_path == (workdir / "config" / "config.json").resolve()
    assert loaded.train.lora_rank == 4


def test_env_selects_config_env_folder(workdir, monkeypatch):
    write_project(workdir, {"lora_rank": 4}, where="config/config.json")
    write_project(workdir, {"lora_rank": 32}, where="config/prod/config.json")
    assert load_config(workdir, env="prod").train.lora_rank == 32
    monkeypatch.setenv("ENV", "prod")
    assert load_config(workdir).train.lora_rank == 32
    assert load_config(workdir, env="default").train.lora_rank == 4
    with pytest.raises(ConfigError, match=r"config/staging/config\.json"):
        load_config(workdir, env="staging")


# -- keys and values ------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(workdir):
    path = write_project(workdir, {"lerning_rate": 1e-4})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "unknown config key 'lerning_rate' in config.json; did you mean 'learning_rate'?"


def test_unknown_key_in_a_dict(workdir):
    with pytest.raises(ConfigError, match="unknown config key 'zzz_qqq' in the config; see docs"):
        load_config({"model_family": "z-image", "zzz_qqq": 1})


def test_leading_dashes_and_string_values_are_coerced(workdir):
    loaded = load_config(
        {
            "--model_family": "z-image",
            "--lora_rank": "16",
            "--learning_rate": "1e-4",
            "--gradient_checkpointing": "true",
            "--validation_disable": "False",
            "--lora_alpha": "none",
            "--max_train_steps": "0",
            "--resolution": 512,
            "--validation_resolution": 768,
            "--model_flavour": "",
            "--peft_lora_target_modules": "to_q, to_k",
        }
    )
    train = loaded.train
    assert train.lora_rank == 16 and isinstance(train.lora_rank, int)
    assert train.learning_rate == 1e-4
    assert train.gradient_checkpointing is True and train.validation_disable is False
    assert train.lora_alpha is None and train.model_flavour is None
    assert train.max_train_steps is None
    assert train.resolution == 512.0 and isinstance(train.resolution, float)
    assert train.validation_sizes() == [(768, 768)]
    assert train.peft_lora_target_modules == ("to_q", "to_k")
    assert load_config({"model_family": "z", "peft_lora_target_modules": '["a", "b"]'}).train.peft_lora_target_modules == ("a", "b")


def test_none_is_a_value_for_the_transformer_subfolder(workdir):
    loaded = load_config({"model_family": "z-image", "pretrained_transformer_subfolder": "none"})
    assert loaded.train.pretrained_transformer_subfolder == "none"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("--lora_rank", "sixteen", "--lora_rank must be a whole number, got 'sixteen'"),
        ("lora_rank", 16.5, "lora_rank must be a whole number, got 16.5"),
        ("gradient_checkpointing", "maybe", "gradient_checkpointing must be true or false, got 'maybe'"),
        ("learning_rate", True, "learning_rate must be a number, got True"),
        ("seed", None, "seed cannot be empty"),
        ("output_dir", ["a"], "output_dir must be a string, got \\['a'\\]"),
    ],
)
def test_bad_value_names_key_and_value(workdir, key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"model_family": "z-image", key: value})


def test_validation_errors_name_the_key(workdir):
    path = write_project(workdir, {"--lora_rank": 0})
    with pytest.raises(ConfigError, match=r"^lora_rank must be > 0, got 0 \(in config.json\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config({"model_family": "z", "enable_group_offload": "true", "enable_model_cpu_offload": "true"})
    with pytest.raises(ConfigError, match="validation_resolution"):
        load_config({"model_family": "z", "validation_resolution": "1024x"})
    with pytest.raises(ConfigError, match="model_family is required"):
        load_config({"lora_rank": 4})


def test_aliases_map_to_fields(workdir):
    train = load_config(
        {
            "model_family": "flux",
            "--checkpointing_steps": 500,
            "validation_steps": "250",
            "adam_beta1": 0.8,
            "--adam_beta2": "0.99",
            "flux_lora_target": "mmdit",
        }
    ).train
    assert train.checkpoint_step_interval == 500
    assert train.validation_step_interval == 250
    assert train.optimizer_betas() == (0.8, 0.99)
    assert train.lora_target == "mmdit"


def test_alias_conflicting_with_its_field_is_an_error(workdir):
    with pytest.raises(ConfigError, match="'checkpointing_steps' and 'checkpoint_step_interval'"):
        load_config({"model_family": "z", "checkpointing_steps": 5, "checkpoint_step_interval": 6})
    # The same value twice is harmless.
    load_config({"model_family": "z", "adam_beta1": 0.9, "optimizer_beta1": "0.9"})


def test_other_family_lora_target_is_ignored_with_a_warning(workdir):
    loaded = load_config({"model_family": "z-image", "flux_lora_target": "mmdit"})
    assert loaded.train.lora_target is None
    assert "flux_lora_target" in loaded.ignored
    assert any("flux_lora_target is ignored: model_family is 'z-image'" in w for w in loaded.warnings)
    assert load_config({"model_family": "z_image", "z_image_lora_target": "all"}).train.lora_target == "all"


def test_ignored_simpletuner_options_are_reported_once(workdir, caplog):
    with caplog.at_level(logging.WARNING, logger="tune.config"):
        loaded = load_config(
            {"model_family": "z-image", "--use_ema": "true", "print_filenames": True, "--disable_benchmark": True}
        )
    assert loaded.ignored == ("disable_benchmark", "print_filenames")
    assert loaded.train.use_ema is True
    messages = [r.getMessage() for r in caplog.records if "accepted but ignored" in r.getMessage()]
    assert messages == ["accepted but ignored (not implemented in tune yet): disable_benchmark, print_filenames"]
    assert loaded.warnings[0] == messages[0]


def test_every_simpletuner_tracker_is_kept(workdir):
    for tracker in ("comet_ml", "wandb", "tensorboard", "all"):
        loaded = load_config({"model_family": "z", "report_to": tracker})
        assert loaded.train.report_to == tracker
        assert not any("report_to" in w for w in loaded.warnings)


def test_packaged_option_list_keeps_comments_and_names():
    from importlib.resources import files

    text = files("tune").joinpath("simpletuner_options.txt").read_text("utf-8")
    assert text.startswith("#")
    names = simpletuner_options()
    assert {"flux_lora_target", "checkpointing_steps", "lora_rank"} <= names
    assert not any(name.startswith("#") for name in names)
    assert "lora_rank" not in ignored_options() and "use_ema" not in ignored_options()
    assert "disable_benchmark" in ignored_options() and "snr_gamma" not in ignored_options()


# -- files around config.json ---------------------------------------------------------------------


def test_data_backend_config_resolves_beside_config_then_cwd(workdir, tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    write_project(project, {})
    config = json.loads((project / "config.json").read_text())
    config["data_backend_config"] = "multidatabackend.json"
    (project / "config.json").write_text(json.dumps(config))
    loaded = load_config(project / "config.json")
    assert loaded.train.data_backend_config == str((project / "multidatabackend.json").resolve())
    assert [d.id for d in loaded.datasets] == ["pics", "text"]

    config["data_backend_config"] = "nowhere.json"
    (project / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_config(project / "config.json")
    assert "data_backend_config 'nowhere.json' not found; looked in:" in str(info.value)
    assert str(project / "nowhere.json") in str(info.value) and str(workdir / "nowhere.json") in str(info.value)


def test_relative_dataset_paths_prefer_cwd_then_config_dir(workdir, tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    (project / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(project / "imgs" / "cat.png")
    (workdir / "cache").mkdir()
    backend = [
        {"id": "pics", "instance_data_dir": "imgs", "cache_dir_vae": "cache/vae"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (project / "multidatabackend.json").write_text(json.dumps(backend))
    (project / "config.json").write_text(json.dumps({"model_family": "z", "data_backend_config": "multidatabackend.json"}))
    pics, text = load_config(project / "config.json").datasets
    assert pics.instance_data_dir == str(project / "imgs")  # only exists beside the config
    assert pics.cache_dir_vae == str(workdir / "cache" / "vae")  # neither exists: the working directory
    assert text.cache_dir == str(workdir / "cache" / "text")


def test_dataset_settings_in_config_json_become_dataset_defaults(workdir):
    path = write_project(workdir, {"--crop": "true", "resolution": 512, "caption_strategy": "filename"})
    pics = load_config(path).datasets[0]
    assert pics.crop is True and pics.resolution == 512.0


def test_dataset_errors_name_the_file(workdir):
    path = write_project(workdir, {})
    (workdir / "multidatabackend.json").write_text(json.dumps([{"id": "x", "resolutoin": 5}]))
    with pytest.raises(ConfigError, match=r"multidatabackend\.json: dataset 'x': unknown key 'resolutoin'"):
        load_config(path)


def test_inline_datasets_in_a_dict(workdir):
    (workdir / "d").mkdir()
    loaded = load_config({"model_family": "z", "data_backend_config": [{"id": "d", "instance_data_dir": "d"}]})
    assert loaded.datasets[0].instance_data_dir == str(workdir / "d")


@pytest.mark.filterwarnings("ignore::tune_data.errors.IgnoredKeysWarning")
def test_zimage_quickstart_loads_with_only_ignored_warnings(workdir):
    loaded = load_config(QUICKSTART)
    assert isinstance(loaded, LoadedConfig)
    assert loaded.config_path == (QUICKSTART / "config.json").resolve()
    assert loaded.warnings and all("accepted but ignored" in w for w in loaded.warnings)
    assert "validation_torch_compile" in loaded.ignored
    train = loaded.train
    assert (train.model_family, train.model_flavour, train.lora_rank) == ("z-image", "turbo", 16)
    assert train.base_model_precision == "int8-torchao"
    assert train.checkpoint_step_interval == 250 and train.validation_step_interval == 250
    assert train.validation_sizes() == [(1024, 1024), (1280, 768)]
    assert train.gradient_checkpointing is True and train.push_to_hub is False
    assert train.user_prompt_library == str(QUICKSTART / "user_prompt_library.json")
    assert [d.id for d in loaded.datasets] == ["camera-photos-512", "my-subject", "text-embeds"]
    assert loaded.datasets[0].instance_data_dir == str(workdir / "datasets" / "camera-photos")


# -- the plan --------------------------------------------------------------------------------------


@pytest.fixture
def fake_family(monkeypatch):
    from tune_models.registry import model_families

    entry = Registration(
        name="z-image",
        target="nowhere:FAMILY",
        plugin="test",
        info={
            "flavours": ["turbo", "base"],
            "flavour_defaults": {"turbo": {"pretrained": "hub/turbo", "assistant_lora": "hub/adapter", "inference_steps": 8, "guidance": 0.0, "shift": 3.0}},
            "default_flavour": "turbo",
            "lora_targets": ["all", "attention"],
            "default_lora_target": "all",
        },
    )
    real_get = model_families.get
    monkeypatch.setattr(model_families, "get", lambda name: entry if name in ("z-image", "z_image") else real_get(name))
    return entry


def test_plan_resolves_family_datasets_and_steps(workdir, fake_family):
    images = {"wide fox.png": (128, 64), "wide cat.png": (128, 64), "square.png": (64, 64)}
    path = write_project(workdir, {"resolution": 64, "aspect_bucket_alignment": 16, "num_train_epochs": 3, "gradient_accumulation_steps": 2, "--disable_benchmark": True}, images=images)
    (workdir / "data" / "notes.bin").write_bytes(b"x")
    plan = build_plan(load_config(path))
    assert plan["family"]["name"] == "z-image"
    assert plan["flavour"] == {"name": "turbo", "default_applied": True, "choices": ["base", "turbo"]}
    assert plan["components"]["base"] == "hub/turbo [flavour default]"
    assert plan["components"]["assistant_lora"] == "hub/adapter [flavour default]"
    pics = plan["datasets"][0]
    assert (pics["seen"], pics["kept"], pics["dropped"]) == (4, 3, 1)
    assert pics["dropped_reasons"] == {"unsupported extension": 1}
    assert sum(pics["buckets"].values()) == 3 and len(pics["buckets"]) == 2
    assert plan["steps"]["batches_per_epoch"] == 3
    assert plan["steps"]["steps_per_epoch"] == 2 and plan["steps"]["total"] == 6
    assert plan["lora"]["target"] == "family default (all)" and plan["lora"]["alpha"] == 16.0
    assert plan["validation"]["steps"] == 8
    assert plan["noise"]["flow_shift"] == "3.0 [flavour default]"
    assert plan["ignored"] == ["disable_benchmark"]
    assert plan["problems"] == []
    json.dumps(plan)  # plain data
    text = format_plan(plan)
    for needle in ("family: z-image", "flavour: turbo (default)", "1 unsupported extension", "buckets:", "no problems found", "disable_benchmark"):
        assert needle in text


def test_plan_collects_problems(workdir, fake_family):
    path = write_project(workdir, {"model_flavour": "nope", "optimizer": "adamw_bf17", "lora_target": "mmdit", "disable_assistant_lora": True})
    plan = build_plan(load_config(path))
    problems = "\n".join(plan["problems"])
    assert "unknown model_flavour 'nope'" in problems and "choose one of: base, turbo" in problems
    assert "unknown optimizer 'adamw_bf17'" in problems
    assert "unknown preset 'mmdit'" in problems
    assert plan["components"]["assistant_lora"].startswith("disabled")
    assert "problems (3):" in format_plan(plan)


def test_plan_unknown_family_lists_registered(workdir):
    path = write_project(workdir, {"model_family": "no-such-family"})
    plan = build_plan(load_config(path))
    assert any(p.startswith("model_family: unknown model family 'no-such-family'") and "Registered:" in p for p in plan["problems"])
    assert "(not registered)" in format_plan(plan)


def test_plan_reports_an_unreadable_dataset(workdir, fake_family):
    path = write_project(workdir, {})
    for file in (workdir / "data").iterdir():
        file.unlink()
    plan = build_plan(load_config(path))
    assert "error" in plan["datasets"][0]
    assert plan["steps"]["total"] is None
    assert any(p.startswith("dataset 'pics'") for p in plan["problems"])


@pytest.mark.parametrize(
    ("flavour", "resolution", "sizes"),
    [
        ("sana-600m-512", None, ["512x512"]),
        ("sana-1.6b-512-multiling", None, ["512x512"]),
        ("sana-1.6b-1024", None, ["1024x1024"]),
        ("sana1.0-1.6b-2048", None, ["2048x2048"]),  # SimpleTuner's name for sana-1.6b-2048
        ("sana-600m-512", "768,512x256", ["768x768", "512x256"]),
    ],
)
def test_plan_validation_sizes_follow_the_flavour_unless_set(workdir, flavour, resolution, sizes):
    """Without validation_resolution, tune check shows the flavour's own size (512 for a 512 px
    checkpoint); a size the user sets wins."""
    config = {"model_family": "sana", "model_flavour": flavour, "validation_prompt": "a fox"}
    if resolution is not None:
        config["validation_resolution"] = resolution
    plan = build_plan(load_config(write_project(workdir, config)))
    assert plan["validation"]["sizes"] == sizes


def test_build_plan_imports_neither_torch_nor_diffusers(workdir):
    path = write_project(workdir, {})
    code = textwrap.dedent(
        f"""
        import json, sys
        from tune.config import load_config
        from tune.plan import build_plan
        build_plan(load_config({str(path)!r}))
        print(json.dumps([m for m in ("torch", "diffusers") if m in sys.modules]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# -- the generated reference -----------------------------------------------------------------------


def test_config_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == module.render(), "run: uv run python scripts/gen_config_reference.py"
    assert f"Accepted but ignored SimpleTuner options ({len(ignored_options())})" in committed


def test_family_prefixed_options_go_to_the_chosen_family(workdir):
    path = write_project(
        workdir,
        {"model_family": "flux", "--flux_guidance_value": "3.5", "flux_guidance_mode": "constant",
         "sd3_clip_uncond_behaviour": "empty_string"},
    )
    loaded = load_config(path)
    assert loaded.train.family_options == {"flux_guidance_value": 3.5, "flux_guidance_mode": "constant"}
    assert "flux_guidance_value" not in loaded.ignored
    assert "sd3_clip_uncond_behaviour" in loaded.ignored  # another family's option: ignored, said once


def test_a_familys_own_option_reaches_it_even_when_simpletuner_has_no_such_key():
    loaded = load_config({"model_family": "flux2", "flux2_guidance_value": 2.5})
    assert loaded.train.family_options == {"flux2_guidance_value": 2.5}


def test_an_unknown_key_named_after_another_family_is_still_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'flux2_guidance_value'"):
        load_config({"model_family": "flux", "flux2_guidance_value": 2.5})


def test_a_misspelt_family_option_is_an_error_naming_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'flux_guidance_value'") as caught:
        load_config({"model_family": "flux", "flux_guidance_valu": 2.5})
    assert "flux_guidance_mode" in str(caught.value)  # and lists the family's options


def test_a_simpletuner_family_key_the_family_does_not_implement_is_ignored_not_passed_on():
    loaded = load_config({"model_family": "flux", "flux_fast_schedule": True, "flux_guidance_value": 2.0})
    assert loaded.train.family_options == {"flux_guidance_value": 2.0}
    assert "flux_fast_schedule" in loaded.ignored
    assert any("flux_fast_schedule" in warning for warning in loaded.warnings)


def test_the_reference_lists_family_options_and_no_longer_calls_them_ignored():
    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert "| flux | `flux_guidance_mode` |" in committed
    assert "flux_guidance_mode" not in ignored_options()
    assert "flux_fast_schedule" in ignored_options()  # SimpleTuner has it; tune's Flux does not


def test_plan_names_block_swap_and_activation_offload(workdir, fake_family):
    path = write_project(workdir, {"musubi_blocks_to_swap": 15, "offload_checkpointed_activations": True})
    offload = build_plan(load_config(path))["precision"]["offload"]
    assert offload.startswith("block swap: the last 15 transformer blocks stream from cpu")
    assert "checkpointed activations wait in CPU memory" in offload


def test_trainer_level_vae_cache_keys_reach_every_dataset(workdir, fake_family):
    path = write_project(workdir, {"vae_cache_ondemand": True, "vae_cache_scan_behaviour": "sync"})
    loaded = load_config(path)
    assert all(d.vae_cache_ondemand and d.vae_cache_scan_behaviour == "sync" for d in loaded.datasets)


def test_plan_names_ramtorch(workdir, fake_family):
    path = write_project(workdir, {"ramtorch": True, "ramtorch_transformer_percent": 50,
                                   "ramtorch_target_modules": "layers.*"})
    offload = build_plan(load_config(path))["precision"]["offload"]
    assert offload.startswith("ramtorch: 50% of the frozen linears matching layers.* stay in CPU memory")


def test_plan_pairs_images_with_their_conditioning_dataset(workdir, fake_family):
    images = {"fox.png": (64, 64), "cat.png": (64, 64), "owl.png": (64, 64)}
    path = write_project(workdir, {}, images=images)
    refs = workdir / "refs"
    refs.mkdir()
    for name in ("fox.jpg", "cat.png"):  # owl has no reference; the extension may differ
        Image.new("RGB", (64, 64), (10, 20, 30)).save(refs / name)
    backend = json.loads((workdir / "multidatabackend.json").read_text())
    backend[0]["conditioning_data"] = "refs"
    backend.insert(1, {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(refs),
                       "conditioning_type": "reference_strict"})
    (workdir / "multidatabackend.json").write_text(json.dumps(backend))
    plan = build_plan(load_config(path))
    pics, conditioning = plan["datasets"][0], plan["datasets"][1]
    assert (pics["seen"], pics["kept"]) == (3, 2) and pics["dropped_reasons"] == {"missing conditioning": 1}
    assert pics["conditioning_data"] == ["refs"]
    assert (conditioning["seen"], conditioning["kept"], conditioning["conditioning_type"]) == (2, 2, "reference_strict")
    text = format_plan(plan)
    assert "paired with conditioning: refs" in text and "(reference_strict)" in text
    assert plan["steps"]["batches_per_epoch"] == 2  # only the paired images train


def test_data_keys_of_config_json_reach_every_dataset_and_tune_check(workdir, fake_family):
    # SimpleTuner's trainer-level data keys: no "ignored" warning, and tune check shows their effect
    # (one 64 px image, batch 2: too small, unless oversubscription raises repeats to 1).
    keys = {"resolution": 64, "aspect_bucket_alignment": 16, "train_batch_size": 2, "max_train_steps": 4,
            "data_backend_sampling": "uniform", "max_upscale_threshold": 0.5, "compress_disk_cache": True}
    path = write_project(workdir, keys, images={"a red fox.png": (64, 64), "tiny.png": (32, 32)})
    plan = build_plan(load_config(path))
    pics = plan["datasets"][0]
    assert pics["dropped_reasons"] == {"too much upscaling": 1}  # 32 -> 64 px is 2x, over 1.5x
    assert pics["batches_per_epoch"] == 0 and any("allow_dataset_oversubscription" in p for p in plan["problems"])

    path = write_project(workdir, {**keys, "allow_dataset_oversubscription": True}, images={})
    loaded = load_config(path)
    assert not {"data_backend_sampling", "max_upscale_threshold", "compress_disk_cache",
                "allow_dataset_oversubscription"} & set(loaded.ignored)
    pics_config = loaded.datasets[0]
    assert (pics_config.data_backend_sampling, pics_config.max_upscale_threshold, pics_config.compress_disk_cache,
            pics_config.allow_dataset_oversubscription) == ("uniform", 0.5, True, True)
    plan = build_plan(loaded)
    pics = plan["datasets"][0]
    assert (pics["batches_per_epoch"], pics["repeats"]) == (1, 1)
    assert not any(p.startswith("dataset 'pics'") for p in plan["problems"])


def test_plan_reads_simpletuner_flavour_names_and_explains_refused_ones(workdir):
    """A SimpleTuner config's ``model_flavour`` resolves to the same checkpoint, or a problem says why not."""
    path = write_project(workdir, {"model_family": "sdxl", "model_flavour": "base-1.0"})
    plan = build_plan(load_config(path))
    assert plan["flavour"]["name"] == "base" and plan["flavour"]["written"] == "base-1.0"
    assert plan["components"]["base"] == "stabilityai/stable-diffusion-xl-base-1.0 [flavour default]"
    assert not [p for p in plan["problems"] if p.startswith("model_flavour")]
    assert "flavour: base (written as 'base-1.0')" in format_plan(plan)
    path = write_project(workdir, {"model_family": "sdxl", "model_flavour": "base-0.9"})
    problems = "\n".join(build_plan(load_config(path))["problems"])
    assert "model_flavour 'base-0.9' of model_family 'sdxl' is not available in tune" in problems
    assert "research preview" in problems
