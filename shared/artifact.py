"""The self-contained, versioned router artifact.

Layout of an artifact directory (local path or ``s3://bucket/prefix``)::

    meta.json               ArtifactMeta (written last: a partial upload has none)
    transform.safetensors   FeatureTransform arrays, "b{i}.{mean,scale,pca_mean,components}"
    weights.safetensors     ensemble member weights, "m{i}.{state_dict key}"
    adapter.safetensors     only with ``meta.adapter``: the adapted encoder blocks (shared.adapter), their
                            AdaptedTop state_dict; the Encoder replica runs them

``meta.files`` holds the sha256 of every safetensors file, checked on load. :func:`load_artifact` returns a
:class:`Router` that needs only numpy, torch and safetensors (no scikit-learn, no Ray, nothing from
``training``), and refuses an artifact with an unknown ``schema_version`` or built for another encoder
(:class:`ArtifactError`). Schema 2 added the value policy to the operating point (any registered policy,
:mod:`shared.policy`), schema 3 the optional adapter (``meta.adapter``, an :class:`shared.adapter.AdapterSpec`,
and ``adapter.safetensors``), schema 4 the optional learned token pooling (``meta.pooled``, ``h{layer}_attn``
blocks and ``tokens.safetensors``: :mod:`shared.pooled_artifact`). Older artifacts lack them and still load.
``meta.policy.novelty`` (optional, any schema): the novelty gate (:mod:`shared.novelty`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

import safetensors.numpy
import safetensors.torch
from pydantic import Field, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator

from shared import storage
from shared.adapter import AdapterSpec
from shared.config import StrictConfig
from shared.errors import ArtifactError  # noqa: F401 (re-exported: callers import it from here)
from shared.features import adapted_from, parse_block
from shared.pooled_head import TOKENS_FILE, pooled_parts
from shared.pooling import PooledSpec
from shared.novelty import NoveltyGate
from shared.policy import Policy, policy_names
from shared.router import Router
from shared.trunk import Ensemble, FeatureTransform, SharedTrunkNet

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # 1: before the value policy, 2: the adapter, 3: the pooling; validate unchanged
META_FILE, TRANSFORM_FILE, WEIGHTS_FILE = "meta.json", "transform.safetensors", "weights.safetensors"
ADAPTER_FILE = "adapter.safetensors"


class EncoderInfo(StrictConfig):
    name: str = Field(description="Registry name of the encoder whose activations are the features.")
    sha256: str | None = Field(None, description="sha256 of the encoder weights (GGUF) when pinned.")
    revision: str | None = Field(None, description="Model revision (hub commit or release tag).")
    chat_template: str | None = Field(None, description="Chat template applied before the forward pass.")


class TargetInfo(StrictConfig):
    name: str = Field(description="Registry name of the target.")
    price_in: float = Field(ge=0, description="USD per 1M input tokens.")
    price_out: float = Field(ge=0, description="USD per 1M output tokens.")
    median_output_tokens: float = Field(ge=0, description="Median answer length on the training data.")


class BlockSpec(StrictConfig):
    name: str = Field(description="Feature block name (shared.features), e.g. 'h12_last'.")
    d_in: int = Field(gt=0, description="Width of the raw activations of this block.")
    d_out: int = Field(gt=0, description="PCA components kept.")


class TransformSpec(StrictConfig):
    kind: Literal["scaler_pca"] = "scaler_pca"
    blocks: list[BlockSpec] = Field(description="Blocks in concatenation order (none: only attn blocks).")


class TrunkSpec(StrictConfig):
    d_in: int = Field(gt=0)
    n_targets: int = Field(gt=0)
    hidden: list[int]
    dropout: list[float]
    n_members: int = Field(gt=0)


class OperatingPoint(StrictConfig):
    """A routing rule chosen on calibration data (``prefill-router evaluate``). On disk the
    parameter sits under the policy's name, every registered policy's key present (the others
    null): ``{"policy": "value", "tolerance": null, "value": 0.02, ...}``."""

    policy: str = Field("tolerance", description="A registered routing policy (shared.policy): 'tolerance' "
                        "(cheapest target within the tolerance of the best) or 'value' (highest value * P(correct) "
                        "- cost), or one added since.")
    param: float = Field(ge=0, description="The policy's calibrated parameter; in the file under the policy's name.")
    target_cost: float | None = Field(None, description="Budget it was calibrated for (mean USD per query).")
    target_accuracy: float | None = Field(None, description="Accuracy it was calibrated for.")
    val_accuracy: float | None = Field(None, description="Accuracy at that point on calibration data.")
    val_cost: float | None = Field(None, description="Mean cost at that point on calibration data.")

    @model_validator(mode="before")
    @classmethod
    def _parameter(cls, data: Any) -> Any:
        """The flat form (``policy`` + each policy's parameter under its name) to ``param``."""
        if not isinstance(data, dict) or "param" in data:
            return data
        data = dict(data)
        name = data.setdefault("policy", "tolerance")
        params = {n: data.pop(n) for n in policy_names() if n in data}
        Policy.named(name)
        if params.get(name) is None:
            raise ValueError(f"the {name} policy needs its parameter {name!r}")
        return {**data, "param": params[name]}

    @model_validator(mode="after")
    def _valid_rule(self) -> "OperatingPoint":
        self.rule()  # the policy's own bounds on its parameter
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        out.pop("param", None)
        head = self.rule().fields()
        return {**head, **{k: v for k, v in out.items() if k not in head}}

    def rule(self) -> Policy:
        return Policy.of(self.policy, self.param)


class PolicyDefaults(StrictConfig):
    tolerance: float = Field(0.20, ge=0, description="Default tolerance when no operating point is set.")
    operating_point: OperatingPoint | None = Field(None, description="Calibrated point; overrides tolerance.")
    novelty: NoveltyGate | None = Field(None, description="Prompts unlike the training ones are routed by the "
                                        "targets' mean scores (shared.novelty); None: no gate.")

    def rule(self) -> Policy:
        """The rule a request without its own routes by: the operating point's, else the tolerance."""
        return self.operating_point.rule() if self.operating_point else Policy.of("tolerance", self.tolerance)


class ArtifactMeta(StrictConfig):
    """Everything needed to serve the router besides the arrays."""

    schema_version: int = SCHEMA_VERSION
    encoder: EncoderInfo
    layers: list[int] = Field(description="Frozen encoder layers whose pooled blocks are read, as transformers "
                                          "hidden_states indices (an adapter's from_layer is in meta.adapter).")
    layer_indexing: Literal["hidden_states"] = Field(
        "hidden_states", description="Index i is hidden_states[i]; 0 is the embedding output."
    )
    pooling: str | dict[str, str] = Field(
        description="'last', 'mean' or 'next' (shared.features), or one per block name.")
    targets: list[TargetInfo] = Field(min_length=1, description="Targets, in logit order.")
    transform: TransformSpec | None = Field(None, description="Filled by save_artifact.")
    trunk: TrunkSpec | None = Field(None, description="Filled by save_artifact.")
    training_metrics: dict[str, Any] = Field(default_factory=dict)
    policy: PolicyDefaults = Field(default_factory=PolicyDefaults)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    files: dict[str, str] = Field(default_factory=dict, description="sha256 per file; filled by save_artifact.")
    adapter: AdapterSpec | None = Field(None, description="Adapted encoder blocks (adapter.safetensors) whose "
                                                          "h<to>a<from>_<pooling> blocks the transform reads; None: "
                                                          "the frozen encoder only.")
    pooled: PooledSpec | None = Field(None, description="Learned token pooling (h<layer>_attn blocks; "
                                                        "shared.pooled_artifact); None: none.")

    @property
    def poolings(self) -> list[str]:
        """The poolings the router reads (sorted, distinct): what an encoder must compute for it."""
        return sorted(set(self.pooling.values())) if isinstance(self.pooling, dict) else [self.pooling]

    @model_validator(mode="after")
    def _block_names(self) -> "ArtifactMeta":
        adapted = set(self.adapter.block_names()) if self.adapter else set()
        for block in self.transform.blocks if self.transform else []:
            parse_block(block.name)
            if adapted_from(block.name) is not None and block.name not in adapted:
                raise ValueError(f"block {block.name} is an adapted block, but the adapter makes {sorted(adapted)}")
        return self

    @model_validator(mode="after")
    def _unique_targets(self) -> "ArtifactMeta":
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate target names: {names}")
        return self


def meta_path(uri: str) -> str:
    """``meta.json`` of the artifact at ``uri``: written last, so its presence marks a complete artifact."""
    return storage.join(uri, META_FILE)


def is_artifact(uri: str) -> bool:
    """Whether a complete artifact (one with its ``meta.json``) is at ``uri``."""
    return storage.exists(meta_path(uri))


def copy_artifact(src: str, dst: str) -> ArtifactMeta:
    """Copy the artifact at ``src`` to ``dst`` (local or s3:// on either side) and check the copy loads.

    ``dst``'s old ``meta.json`` is deleted first and the new one is written last, so a copy
    cut short is never mistaken for a complete artifact (nor are old weights beside a new meta)."""
    read_meta(src)
    if storage.exists(meta_path(dst)):
        fs, path = storage.filesystem(meta_path(dst))
        fs.delete_file(path)
    for name in [*read_meta(src).files, META_FILE]:  # every checksummed file, then the meta
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return load_artifact(dst).meta  # checksums match: the copy is usable


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(uri: str, meta: ArtifactMeta, transform: FeatureTransform, ensemble: Ensemble,
                  adapter: Any = None) -> ArtifactMeta:
    """Write the artifact directory at ``uri`` (local or ``s3://``); returns the meta as
    written (transform/trunk specs and file checksums filled in from the objects). ``adapter``: a
    :class:`shared.adapter.AdaptedTop` (its spec becomes ``meta.adapter``, its weights ``adapter.safetensors``)."""
    members = list(ensemble.members)
    first = members[0]
    if first.n_targets != len(meta.targets):
        raise ArtifactError(f"ensemble has {first.n_targets} outputs but meta lists {len(meta.targets)} targets")
    if first.d_in != transform.d_out:
        raise ArtifactError(f"ensemble expects {first.d_in} features but the transform gives {transform.d_out}")
    if any(m.spec() != first.spec() for m in members):
        raise ArtifactError("ensemble members differ in architecture")
    weights = {f"m{i}.{k}": v.detach().cpu().contiguous() for i, m in enumerate(members)
               for k, v in m.state_dict().items()}
    blobs = {
        TRANSFORM_FILE: safetensors.numpy.save(transform.to_arrays()),
        WEIGHTS_FILE: safetensors.torch.save(weights),
    }
    if adapter is not None:
        blobs[ADAPTER_FILE] = safetensors.torch.save({k: v.detach().cpu().contiguous()
                                                      for k, v in adapter.state_dict().items()})
    final = meta.model_copy(update={
        "adapter": adapter.spec if adapter is not None else None,
        "schema_version": 3 if adapter is not None else 2,  # the lowest that describes it: older builds read it
        "transform": TransformSpec(blocks=[BlockSpec(**b) for b in transform.spec()]),
        "trunk": TrunkSpec(**first.spec(), n_members=len(members)),
        "files": {name: _sha256(data) for name, data in blobs.items()},
    })
    final = ArtifactMeta.model_validate(final.model_dump())  # re-validate the copy
    for name, data in blobs.items():
        storage.write_bytes(storage.join(uri, name), data)
    storage.write_bytes(meta_path(uri), (final.model_dump_json(indent=2) + "\n").encode())
    return final


def update_meta(uri: str, policy: PolicyDefaults | None = None,
                training_metrics: dict[str, Any] | None = None) -> ArtifactMeta:
    """Replace the artifact's policy (e.g. a calibrated operating point) and/or its training
    metrics (e.g. evaluate's task-level references) by rewriting ``meta.json`` only; the
    safetensors files and their checksums are untouched, so the artifact still loads.
    Returns the new meta."""
    meta = read_meta(uri).model_dump()
    if policy is not None:
        meta["policy"] = PolicyDefaults.model_validate(policy).model_dump()
    if training_metrics is not None:
        meta["training_metrics"] = training_metrics
    new = ArtifactMeta.model_validate({**meta, "schema_version": max(meta["schema_version"], 2)})  # policy: 2+
    storage.write_bytes(storage.join(uri, META_FILE), (new.model_dump_json(indent=2) + "\n").encode())
    return new


def update_policy(uri: str, policy: PolicyDefaults) -> ArtifactMeta:
    """Replace the artifact's policy only (:func:`update_meta`)."""
    return update_meta(uri, policy=policy)


def _read(uri: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, name))
    except (FileNotFoundError, OSError) as exc:
        raise ArtifactError(f"router artifact at {uri}: cannot read {name} ({exc})") from exc


def _check_encoder(uri: str, have: EncoderInfo, expected: str | EncoderInfo | Mapping | None) -> None:
    """Names must match; sha256/revision/chat_template too wherever both sides set them."""
    if expected is None:
        return
    if isinstance(expected, str):
        expected = EncoderInfo(name=expected)
    elif not isinstance(expected, EncoderInfo):
        expected = EncoderInfo.model_validate(expected)
    for key in ("name", "sha256", "revision", "chat_template"):
        want, got = getattr(expected, key), getattr(have, key)
        comparable = key == "name" or (want is not None and got is not None)
        if comparable and want != got:
            raise ArtifactError(
                f"router artifact at {uri} was trained on encoder {key}={got!r}, but this server runs "
                f"{key}={want!r}; its features would be meaningless. Serve with the artifact's encoder "
                f"or retrain the router for this one."
            )


def read_meta(uri: str) -> ArtifactMeta:
    """Read and validate ``meta.json``; the schema version is checked before the fields."""
    try:
        raw = json.loads(_read(uri, META_FILE))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"router artifact at {uri}: {META_FILE} is not JSON ({exc})") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"router artifact at {uri} has schema_version={version!r}; this build reads only "
            f"schema_version={' or '.join(map(str, READABLE_VERSIONS))}. Re-export the artifact with a matching "
            "version of the code."
        )
    try:
        return ArtifactMeta.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"router artifact at {uri}: invalid {META_FILE}:\n{exc}") from exc


def load_artifact(uri: str, expected_encoder: str | EncoderInfo | Mapping | None = None) -> "Router":
    """Load the artifact at ``uri``; ``expected_encoder`` (a name or an :class:`EncoderInfo`)
    is compared with the artifact's encoder. Raises :class:`ArtifactError` on any problem."""
    meta = read_meta(uri)
    _check_encoder(uri, meta.encoder, expected_encoder)
    if meta.transform is None or meta.trunk is None:
        raise ArtifactError(f"router artifact at {uri}: meta lacks the transform or trunk spec")
    arrays = {}
    for name in (TRANSFORM_FILE, WEIGHTS_FILE) + ((TOKENS_FILE,) if meta.pooled else ()):
        data = _read(uri, name)
        if meta.files.get(name) != _sha256(data):
            raise ArtifactError(f"router artifact at {uri}: {name} does not match its sha256 in {META_FILE}")
        arrays[name] = data
    if meta.pooled is not None:  # attn blocks: a PooledTransform and PooledTrunkNet members (shared.pooled_head)
        return Router(meta, *pooled_parts(meta, arrays, TRANSFORM_FILE, WEIGHTS_FILE))
    transform = FeatureTransform.from_arrays(
        [b.name for b in meta.transform.blocks], safetensors.numpy.load(arrays[TRANSFORM_FILE])
    )
    weights = safetensors.torch.load(arrays[WEIGHTS_FILE])
    t = meta.trunk
    members = []
    for i in range(t.n_members):
        net = SharedTrunkNet(t.d_in, t.n_targets, t.hidden, t.dropout)
        prefix = f"m{i}."
        net.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        members.append(net.eval())
    return Router(meta, transform, Ensemble(members).eval())


def load_adapter(uri: str, model: Any, meta: ArtifactMeta | None = None) -> Any:
    """The artifact's adapted blocks, a :class:`shared.adapter.AdaptedTop` built on ``model`` (the loaded causal
    LM of the artifact's encoder: its config and block class) with the weights of ``adapter.safetensors``
    (sha256 checked); None when the artifact has no adapter."""
    from shared.adapter import AdaptedTop

    meta = meta or read_meta(uri)
    if meta.adapter is None:
        return None
    data = _read(uri, ADAPTER_FILE)
    if meta.files.get(ADAPTER_FILE) != _sha256(data):
        raise ArtifactError(f"router artifact at {uri}: {ADAPTER_FILE} does not match its sha256 in {META_FILE}")
    top = AdaptedTop.from_model(model, meta.adapter)
    try:
        top.load_state_dict(safetensors.torch.load(data))
    except RuntimeError as exc:
        raise ArtifactError(f"router artifact at {uri}: {ADAPTER_FILE} does not fit the blocks of "
                            f"{meta.encoder.name}: {exc}") from exc
    return top.eval()
