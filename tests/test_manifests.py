"""Manifests: typed, versioned records of a run and a merge; readers get typed fields or a one-line refusal."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import check_manifests_under, make_run_manifest
from lora_ft.errors import LoraftError
from lora_ft.artifacts.manifests import SCHEMA_VERSION, MergeManifest, RunManifest, read_manifest, write_manifest


def test_finished_run_manifest_reads_back_as_typed_fields(tiny_run):
    manifest = read_manifest(tiny_run, RunManifest)
    assert manifest.schema_version == SCHEMA_VERSION == 1
    assert manifest.metrics.steps == 30 and manifest.lora.rank == 4 and manifest.lora.scaling == 2.0
    assert manifest.base_model.quantization is None and manifest.precision == "fp32"
    assert manifest.metrics.heldout["adapter"].rows == 8


def test_manifest_is_frozen(tiny_run):
    manifest = read_manifest(tiny_run, RunManifest)
    with pytest.raises(ValidationError, match="frozen"):
        manifest.seed = 1


def test_unversioned_manifest_of_earlier_loraft_is_read_as_version_1(tmp_path):
    written = make_run_manifest("base", "f" * 16).model_dump(mode="json")
    del written["schema_version"]
    (tmp_path / "manifest.json").write_text(json.dumps(written))
    assert read_manifest(tmp_path, RunManifest).schema_version == 1


@pytest.mark.parametrize("version, hint", [(2, "upgrade loraft"), (0, "rewrite it")])
def test_manifest_of_another_schema_version_is_refused_naming_both_versions(tmp_path, version, hint):
    written = {**make_run_manifest("base", "f" * 16).model_dump(mode="json"), "schema_version": version}
    (tmp_path / "manifest.json").write_text(json.dumps(written))
    with pytest.raises(LoraftError, match=f"schema_version {version} is not the one this loraft reads \\(1\\); {hint}"):
        read_manifest(tmp_path, RunManifest)


def test_partial_manifest_is_refused_naming_the_missing_field(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"base_model": {"name": "m"}}))
    with pytest.raises(LoraftError, match=r"manifest.json: loraft_version: field required \(not a RunManifest"):
        read_manifest(tmp_path, RunManifest)


def test_writer_and_reader_round_trip_equal(tmp_path):
    manifest = make_run_manifest("base", "f" * 16, quantization={"bits": 4})
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path, RunManifest)
    assert again == manifest
    assert again.base_model.quantization.quant_type == "nf4"  # QuantizationSpec's default, not restated by readers


def test_every_loraft_manifest_under_a_folder_is_checked(tmp_path, tiny_run):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    assert check_manifests_under(tmp_path) == 1
    broken = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del broken["metrics"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(LoraftError, match="metrics: field required"):
        check_manifests_under(tmp_path)
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({**broken, "schema_version": 9}))  # left to its test
    assert check_manifests_under(tmp_path) == 0
    assert MergeManifest.FILE == "merge_manifest.json"
