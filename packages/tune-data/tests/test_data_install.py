"""tune-data installs alone, without torch: its data pipeline imports, `tune-data inspect` reports a
local dataset, and `tune-data caption` runs (the ``filename`` captioner, and a stub captioner plugin
found by entry point), all without importing torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
def test_installs_and_imports_without_torch(tmp_path):
    venv = tmp_path / "venv"
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")

    def run(*command):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
        return done

    run("uv", "venv", str(venv), "--python", "python3", "--quiet")
    run("uv", "pip", "install", "--quiet", "--python", str(python), str(PACKAGE))
    run(
        str(python),
        "-c",
        "import tune_data.discovery, tune_data.buckets, tune_data.sampler, tune_data.cache, "
        "tune_data.cli, tune_data.testing, sys; assert 'torch' not in sys.modules, 'torch was imported'",
    )
    done = run(str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)")
    assert done.stdout.strip() == "True"  # the venv really has no torch
    run(str(venv / "bin" / "tune-data"), "--help")
    assert "--captioner" in run(str(venv / "bin" / "tune-data"), "caption", "--help").stdout

    # The captioning pipeline, built-in and plugin captioners, with torch absent.
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("red_square", "blue_circle"):
        Image.new("RGB", (16, 16)).save(images / f"{name}.png")
    stub = tmp_path / "stub"
    (stub / "stub_captioner").mkdir(parents=True)
    (stub / "pyproject.toml").write_text(
        '[project]\nname = "stub-captioner"\nversion = "0.0.1"\n'
        '[project.entry-points.tune]\nstub = "stub_captioner"\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    (stub / "stub_captioner" / "__init__.py").write_text(
        "from tune_data.plugins import hookimpl\n"
        "class Stub:\n"
        "    @classmethod\n"
        "    def from_options(cls, options):\n"
        "        return cls()\n"
        "    def caption(self, images):\n"
        "        return ['stub ' + image.info['tune_path'] for image in images]\n"
        "@hookimpl\n"
        "def tune_register_captioners(register):\n"
        "    register('stub', Stub, description='test stub')\n"
    )
    run("uv", "pip", "install", "--quiet", "--python", str(python), str(stub))
    script = (
        "import sys; from tune_data.cli import main; "
        f"assert main(['caption', {str(images)!r}, '--captioner', 'filename', '--no-progress']) == 0; "
        f"assert main(['caption', {str(images)!r}, '--captioner', 'stub', '--output', 'jsonl', '--no-progress']) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    run(str(python), "-c", script)
    assert (images / "red_square.txt").read_text() == "red square\n"

    # Inspecting that local dataset (its cache folder empty), still without torch.
    config = tmp_path / "multidatabackend.json"
    config.write_text(
        '[{"id": "shapes", "instance_data_dir": ' + repr(str(images)).replace("'", '"')
        + ', "caption_strategy": "textfile", "resolution": 16, "aspect_bucket_alignment": 8}]'
    )
    script = (
        "import io, json, sys, contextlib; from tune_data.cli import main; out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    code = main(['inspect', {str(config)!r}, '--json', '--cache-dir', {str(tmp_path / 'cache')!r}])\n"
        "assert code == 0, out.getvalue()\n"
        "(info,) = json.loads(out.getvalue())\n"
        "assert (info['seen'], info['kept'], info['buckets']) == (3, 2, {'16x16': 2}), info\n"
        # The stub's captions.jsonl sits among the images: reported, with its reason.
        "assert info['dropped'] == {'unsupported extension': ['captions.jsonl']}, info\n"
        "assert info['latent_cache']['missing'] == 2, info\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    run(str(python), "-c", script)
    assert '"caption": "stub blue_circle.png"' in (images / "captions.jsonl").read_text()
