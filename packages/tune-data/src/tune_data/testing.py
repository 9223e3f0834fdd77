"""Helpers for tests: a tiny synthetic dataset, and the conformance suite for storage providers.

:func:`make_shapes_dataset` writes small PNGs of coloured shapes whose captions say exactly what is
drawn, so a test (or a smoke run of training) has real, learnable data without a download.

:class:`StorageProviderTests` is what a storage plugin's own test-suite subclasses::

    from tune_data.testing import StorageProviderTests

    class TestMyStorage(StorageProviderTests):
        def make_storage(self, tmp_path, files):
            ...  # put ``files`` somewhere, return a provider rooted there

tune's ``LocalStorage`` passes the very same suite. pytest is imported only inside its tests, so
importing this module does not need pytest.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from tune_data.storage import StorageProvider

__all__ = ["make_shapes_dataset", "make_video", "StorageProviderTests", "SHAPES", "COLOURS"]

SHAPES = ("circle", "square", "triangle")
#: Shape colour -> (RGB, background name, background RGB): each shape stands out from its ground.
COLOURS: dict[str, tuple[tuple[int, int, int], str, tuple[int, int, int]]] = {
    "red": ((220, 30, 30), "white", (255, 255, 255)),
    "green": ((30, 180, 60), "black", (0, 0, 0)),
    "blue": ((30, 60, 220), "white", (255, 255, 255)),
    "yellow": ((240, 220, 30), "black", (0, 0, 0)),
}


def _draw_shape(size: tuple[int, int], shape: str, colour: str, rng: random.Random) -> Image.Image:
    fill, _, background = COLOURS[colour]
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    width, height = size
    extent = int(min(width, height) * rng.uniform(0.45, 0.7))
    left = rng.randint(0, width - extent)
    top = rng.randint(0, height - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill
        )
    return image


def make_video(
    path: str | os.PathLike[str],
    *,
    frames: int = 8,
    size: tuple[int, int] = (64, 48),
    fps: int = 8,
) -> Path:
    """Write a small video (``.mp4``: H.264, ``.webm``: VP9) with PyAV (``tune-data[video]``).

    Frame ``i`` is a flat grey of level ``(16 * i) % 256`` (a lossy codec keeps such flat frames to
    within a few levels), so a test can tell which frames a clip sampled: ``level // 16``.
    """
    import av
    import numpy as np

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    codec = "libvpx-vp9" if target.suffix.lower() == ".webm" else "libx264"
    width, height = size
    with av.open(str(target), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        for index in range(frames):
            pixels = np.full((height, width, 3), (16 * index) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return target


def make_shapes_dataset(
    path: str | os.PathLike[str],
    *,
    count: int = 16,
    size: tuple[int, int] = (64, 64),
    caption_strategy: str = "textfile",
    seed: int = 0,
    varied_sizes: bool = False,
) -> Path:
    """Write ``count`` PNGs of coloured shapes into ``path`` and return it.

    Captions read like ``"a red circle on a white background"``. With ``textfile`` each image gets
    a ``.txt`` beside it; with ``filename`` the caption is the file name (underscores for spaces),
    one image per numbered subfolder so names stay unique; with ``instanceprompt`` the files are
    just numbered. ``varied_sizes`` cycles ``size``, a 3:2 landscape and a 2:3 portrait of it, so
    the images fall into several aspect buckets. The same ``seed`` writes the same files.
    """
    if caption_strategy not in ("textfile", "filename", "instanceprompt"):
        raise ValueError(
            f"caption_strategy must be textfile, filename or instanceprompt, got {caption_strategy!r}"
        )
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width, height = size
    sizes = [size, (width * 3 // 2, height), (width, height * 3 // 2)] if varied_sizes else [size]
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour = list(COLOURS)[index % len(COLOURS)]  # with 3 shapes: 12 distinct pairs
        caption = f"a {colour} {shape} on a {COLOURS[colour][1]} background"
        image = _draw_shape(sizes[index % len(sizes)], shape, colour, rng)
        if caption_strategy == "filename":
            target = root / f"{index:04d}" / (caption.replace(" ", "_") + ".png")
            target.parent.mkdir(exist_ok=True)
        else:
            target = root / f"{index:04d}.png"
        image.save(target)
        if caption_strategy == "textfile":
            target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return root


class StorageProviderTests:
    """Conformance tests for a :class:`~tune_data.storage.StorageProvider` implementation.

    Subclass it in a class whose name starts with ``Test`` and implement :meth:`make_storage`.
    Override :meth:`write_file` if the provider's ``fs`` cannot write (it must change a file's
    content so the identity test can see the change).
    """

    def make_storage(self, tmp_path: Path, files: dict[str, bytes]) -> StorageProvider:
        """Return a provider whose root holds exactly ``files`` (relative POSIX path -> content)."""
        raise NotImplementedError("subclasses of StorageProviderTests implement make_storage")

    def write_file(self, storage: StorageProvider, rel: str, data: bytes) -> None:
        """Replace the content of one file (through the provider's fsspec filesystem by default)."""
        storage.fs.pipe_file(storage.root.rstrip("/") + "/" + rel, data)

    files: dict[str, bytes] = {
        "b.png": b"png bytes",
        "a/c.JPG": b"jpeg bytes",
        "a/deeper/d.txt": b"a caption",
        "e.webp": b"",
    }

    def _storage(self, tmp_path: Path) -> StorageProvider:
        return self.make_storage(tmp_path, dict(self.files))

    def test_is_a_storage_provider(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        assert isinstance(storage, StorageProvider)
        assert isinstance(storage.root, str)

    def test_list_files_is_recursive_sorted_and_relative(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        assert storage.list_files(None) == sorted(self.files)

    def test_list_files_filters_extensions_case_insensitively(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        assert storage.list_files([".png", "jpg"]) == ["a/c.JPG", "b.png"]
        assert storage.list_files([".gif"]) == []

    def test_read_bytes_and_open(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        assert storage.read_bytes("a/deeper/d.txt") == b"a caption"
        assert storage.read_bytes("e.webp") == b""
        with storage.open("b.png", "rb") as handle:
            assert handle.read() == b"png bytes"

    def test_missing_file_raises_file_not_found(self, tmp_path: Path) -> None:
        import pytest

        storage = self._storage(tmp_path)
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("nope.png")

    def test_exists(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        assert storage.exists("a/c.JPG")
        assert not storage.exists("a/c.jpg.txt")
        assert not storage.exists("missing.png")

    def test_identity_is_stable_and_follows_content(self, tmp_path: Path) -> None:
        storage = self._storage(tmp_path)
        first = storage.identity("b.png")
        assert isinstance(first, str) and first
        assert storage.identity("b.png") == first
        self.write_file(storage, "b.png", b"different and longer png bytes")
        assert storage.read_bytes("b.png") == b"different and longer png bytes"
        assert storage.identity("b.png") != first
