"""The manifests loraft writes beside its artifacts, as typed, versioned, frozen records.

`manifest.json` (a finished run folder) is a `RunManifest`; `merge_manifest.json` (a merged model
folder) is a `MergeManifest`. They are written and read here only: writers build the model (so a
missing or misspelt field fails in the writer, not in a later reader), readers get typed fields,
never `.get(key, default)`. Each carries `schema_version`. A manifest written before versioning
(no `schema_version`: loraft 0.1 before this module) has the same fields and is read as version 1;
one of a version this loraft does not know is refused with a message naming both versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_ft.artifacts.run_dir import atomic_write_text
from lora_ft.config import QuantizationSpec, ServingSpec
from lora_ft.errors import LoraftError
from lora_ft.artifacts.findings import Finding

RUN_MANIFEST = "manifest.json"
MERGE_MANIFEST = "merge_manifest.json"
SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# manifest.json: a finished training run


class BaseModelRecord(Record):
    name: str = Field(description="The base model as the config named it.")
    revision: str | None
    resolved_path: str = Field(description="Where its weights were read from.")
    fingerprint: str = Field(description="fingerprint.py's digest of the base weights; merge and eval compare it.")
    model_type: str
    quantization: QuantizationSpec | None = Field(description="The 4/8-bit settings training loaded the base with.")


class LoraRecord(Record):
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    # Fields added after loraft 0.1's first manifests default to what those runs did, so their manifests still read.
    target_parameters: list[str] = Field([], description="nn.Parameter targets (MoE experts, the router).")
    coverage: dict[str, Any] | None = Field(None, description="coverage.py: the share of each block type the adapter reaches.")
    use_rslora: bool
    use_dora: bool
    init: str = Field("default", description="lora.init (PiSSA/OLoRA are saved converted: see converted).")
    converted: dict[str, Any] | None = Field(None, description="How a PiSSA/OLoRA adapter was converted for the original base.")
    parameter_wrappers: dict[str, dict[str, Any]] = Field({}, description="Per wrapped parameter: how inspect reads it.")


class ChatRecord(Record):
    template: str | None = Field(description="model.chat_template, 'tokenizer' for the tokenizer's own, or None.")
    end_of_turn: str | None
    stop_token_ids: int | list[int] | None
    train_on: str


class DistributedRecord(Record):
    world_size: int
    strategy: str | None
    effective_batch_size: int


class DataRecord(Record):
    format: str
    sources: list[dict[str, Any]] = Field(description="Per source: role, path, sha256 (local) or split, rows, used, tokens.")
    dropped_rows: int
    heldout_overlap: dict[str, Any] | None = Field(None, description="Eval rows with a copy in train (data_check.HeldoutOverlap).")


class HeldoutScore(Record):
    loss: float
    perplexity: float
    tokens: int
    rows: int


class MetricsRecord(Record):
    steps: int
    epochs: float
    train_loss: float | None
    tokens_seen: int
    peak_gpu_memory_gib: float | None
    heldout: dict[Literal["base", "adapter"], HeldoutScore] = Field(description="Empty without eval data.")


class EnvironmentRecord(Record):
    model_config = ConfigDict(extra="allow", frozen=True)  # one entry per library version recorded
    python: str
    platform: str
    device: str


class AdviceRecord(Record):
    before: list[Finding] = Field([], description="training.advice: what the pre-flight advised (validate prints the same).")
    after: list[Finding] = Field([], description="What the run did, read against that advice (train's summary, inspect).")
    off: list[str] = Field([], description="advice.off: the rules the config silenced.")


class RunManifest(Record):
    """What a finished run folder promises; its presence means 'finished'."""

    FILE: ClassVar[str] = RUN_MANIFEST
    schema_version: Literal[1] = SCHEMA_VERSION
    loraft_version: str
    status: Literal["finished"] = "finished"
    created: str
    wall_seconds: float
    config_hash: str
    base_model: BaseModelRecord
    lora: LoraRecord
    chat: ChatRecord
    stop_tokens: dict[str, Any] | None = Field(
        None, description="stop_tokens.py: stop/turn tokens whose rows looked untrained, which rows trained, how often it stops."
    )
    trainable_params: int
    total_params: int
    precision: Literal["bf16", "fp16", "fp32"]
    speed: dict[str, Any] = Field(description="speed.SpeedPlan.to_json(): the kernels and checkpointing used.")
    distributed: DistributedRecord
    seed: int
    data: DataRecord
    metrics: MetricsRecord
    environment: EnvironmentRecord
    serving: ServingSpec
    adapter_stats: dict[str, Any] = Field(description="model/rank_stats.adapter_statistics(): what `loraft inspect` reports.")
    preference: dict[str, Any] | None = Field(
        None, description="Preference runs (training/preference.py): method, its keys, the reference, the chain of runs "
        "it started from (model.adapter), held-out preference accuracy base and adapter."
    )
    advice: AdviceRecord | None = Field(None, description="Advice before the run and what the run did against it.")


# ---------------------------------------------------------------------------------------------
# merge_manifest.json: a merged model folder


class MergedBaseRecord(Record):
    name: str
    resolved_path: str
    fingerprint: str
    recorded_fingerprint: str | None = Field(description="The fingerprint the adapter's run recorded (None: foreign adapter).")
    fingerprint_matches: bool | None


class MergedAdapterRecord(Record):
    path: str
    sha256: str
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    trained_quantization: QuantizationSpec | None


class ModuleCheckRecord(Record):
    tensors: int
    max_abs_error: float
    max_error_to_bound: float


class VerificationRecord(Record):
    per_module: ModuleCheckRecord
    logits: dict[str, Any] | None = Field(description="merge_check.verify_logits() figures, None when skipped.")
    logits_skipped: str | None


class MergeManifest(Record):
    FILE: ClassVar[str] = MERGE_MANIFEST
    schema_version: Literal[1] = SCHEMA_VERSION
    loraft_version: str
    created: str
    base_model: MergedBaseRecord
    force: bool
    adapter: MergedAdapterRecord
    qlora_base: str | None
    dtype: str
    shards: int
    bytes_written: int
    merge_seconds: float
    mb_per_s: float
    adapted_tensors: list[str]
    scalings: list[float]
    replaced: list[str]
    token_rows: dict[str, list[int]] = Field({}, description="Trained token rows (lora.train_tokens) written into each embedding.")
    untied_embeddings: bool
    verification: VerificationRecord
    serving: ServingSpec | None
    wall_seconds: float


# ---------------------------------------------------------------------------------------------
# Reading and writing

M = TypeVar("M", bound=Record)


def write_manifest(folder: str | Path, manifest: RunManifest | MergeManifest) -> Path:
    """Write the manifest into `folder` atomically (temporary name, then rename)."""
    path = Path(folder) / manifest.FILE
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(folder: str | Path, kind: type[M]) -> M:
    """The typed manifest in `folder`; LoraftError (exit 2) naming the file for anything unreadable."""
    path = Path(folder) / kind.FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraftError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraftError(f"{path}: not valid JSON ({exc})") from None
    return parse_manifest(raw, kind, where=str(path))


def parse_manifest(raw: Any, kind: type[M], *, where: str = "manifest") -> M:
    if not isinstance(raw, dict):
        raise LoraftError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)  # unversioned: written before versioning, same fields
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise LoraftError(
            f"{where}: schema_version {version!r} is not the one this loraft reads ({SCHEMA_VERSION}); "
            + ("upgrade loraft to read it" if newer else "rewrite it with this loraft (train, or merge again)")
        )
    try:
        return kind.model_validate({**raw, "schema_version": SCHEMA_VERSION})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise LoraftError(f"{where}: {key}: {first['msg'].lower()} (not a {kind.__name__} loraft can read)") from None
