"""export_manifest.json: what `loraft export` wrote, under which engine rule, and how it was verified.

A frozen, versioned pydantic model (bump SCHEMA_VERSION when a field changes meaning), so CI and
deployment scripts can read it without guessing at keys.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
EXPORT_MANIFEST = "export_manifest.json"


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineRuleRecord(Frozen):
    name: str
    source: str = Field(description="The engine files the rule was read from.")
    layout: str
    scaling: str
    reads_keys: list[str] | None
    integer_alpha: bool
    max_rank: int | None
    refuses: list[str]


class ExportVerification(Frozen):
    method: str = Field(description="How the written files were read back and applied.")
    prompts: int
    tokens: int
    max_abs_diff: float = Field(description="max |engine rule on the written files - PEFT base+adapter| over all logits")
    tolerance: float
    adapter_effect: float | None = Field(description="max |base - base+adapter|: what the adapter changes, for scale")


class ExportManifest(Frozen):
    schema_version: int = SCHEMA_VERSION
    loraft_version: str
    created: str
    target: str
    rule: EngineRuleRecord
    run_dir: str
    adapter_sha256: str
    base_model: str = Field(description="The base as the run recorded it (may be pkg://...).")
    base_for_target: str = Field(description="The base as the target loads it (a real path or Hub id).")
    base_fingerprint_matches: bool | None
    lora_alpha: float | None = Field(description="alpha written for the target (None for a merged model)")
    use_rslora: bool | None
    folded_modules: int = Field(0, description="modules whose scale was folded into lora_B")
    conversions: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(description="file name -> sha256")
    command: str | None = Field(None, description="How to serve it.")
    verification: ExportVerification | None
