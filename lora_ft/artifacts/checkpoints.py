"""Checkpoints that are either complete or invisible, and the choice of which one a resume uses.

The Trainer writes `checkpoint-N` in place, file by file, and on resume trusts whatever folder has
the highest N: a kill during a save leaves a torn folder it then picks, and a checkpoint missing its
optimizer, scheduler or RNG file resumes silently and ends far off (see shared/README.md). Here a
checkpoint is saved into `checkpoints/.partial/checkpoint-N`, its pickled `training_args.bin` (which
can hold the Hub token) is deleted, a manifest of sizes and SHA-256s is written last, and only then
is the folder renamed into place. On resume every candidate is re-validated against its manifest,
newest first; a damaged one is skipped with a warning naming what is wrong.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_ft import __version__
from lora_ft.config_io import redact
from lora_ft.errors import LoraftError
from lora_ft.artifacts.run_dir import atomic_write_json, atomic_write_text, file_sha256
from lora_ft.yaml_io import load_yaml

PREFIX = "checkpoint-"
STAGING = ".partial"
MANIFEST = "loraft_checkpoint.json"
REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json")
PICKLED_ARGS = "training_args.bin"
# Room kept free beyond the checkpoint itself, so a full disk shows up here and not mid-write.
DISK_MARGIN = 64 * 2**20


class DiskFullError(LoraftError):
    """Not enough free space to write the next checkpoint; the last good one is untouched."""


@dataclass(frozen=True)
class CheckpointProblem:
    path: Path
    reason: str


def checkpoint_step(path: Path) -> int | None:
    name = Path(path).name
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def list_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, oldest first (by N, never by mtime)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# ---------------------------------------------------------------------------------------------
# Validation


def validate_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and matches its manifest, else the reason it is not."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    missing = [name for name in REQUIRED if name not in files or not (path / name).is_file()]
    if not any(name.startswith("rng_state") for name in files):
        missing.append("rng_state.pth")
    if missing:
        return f"missing {', '.join(missing)}"
    if manifest.get("step") != checkpoint_step(path):
        return f"its manifest says step {manifest.get('step')}"
    for name, expected in files.items():
        target = path / name
        if not target.is_file():
            return f"missing {name}"
        if target.stat().st_size != expected["size"]:
            return f"{name} is {target.stat().st_size} bytes, expected {expected['size']}"
        if file_sha256(target) != expected["sha256"]:
            return f"{name} does not match its checksum"
    header = _safetensors_problem(path / "adapter_model.safetensors")
    if header:
        return header
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except ValueError:
        return "trainer_state.json is not valid JSON"
    if state.get("global_step") != checkpoint_step(path):
        return f"trainer_state.json says step {state.get('global_step')}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    # Header: 8-byte little-endian length, then that many bytes of JSON; the data must fill the rest.
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"{path.name} is truncated"
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            return f"{path.name} has a header longer than the file"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path.name} is {size} bytes, its header describes {8 + length + end}"
    return None


def latest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[CheckpointProblem]]:
    """The newest checkpoint that validates, and the newer ones that did not (to warn about)."""
    skipped = []
    for candidate in reversed(list_checkpoints(folder)):
        reason = validate_checkpoint(candidate)
        if reason is None:
            return candidate, skipped
        skipped.append(CheckpointProblem(candidate, reason))
    return None, skipped


# ---------------------------------------------------------------------------------------------
# Saving: stage, strip, manifest, rename, rotate


class CheckpointWriter:
    """What the Trainer subclass calls around its own `_save_checkpoint`."""

    def __init__(self, folder: Path, *, keep: int, trainable_params: int):
        self.folder = Path(folder)
        self.staging_parent = self.folder / STAGING
        self.keep = keep
        self.trainable_params = trainable_params

    def staged(self, step: int) -> Path:
        return self.staging_parent / f"{PREFIX}{step}"

    def final(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step}"

    def begin(self, step: int, model) -> Path:
        """Refuse to save a non-finite state or onto a disk that cannot hold it; return the staging path."""
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not p.detach().isfinite().all()]
        if bad:
            raise LoraftError(
                f"step {step}: refusing to checkpoint non-finite weights ({bad[0]}); the last good checkpoint is kept"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging_parent, ignore_errors=True)
        self.staging_parent.mkdir()
        self.check_disk(step)
        return self.staged(step)

    def estimate_bytes(self) -> int:
        previous = list_checkpoints(self.folder)
        if previous:
            return sum(f.stat().st_size for f in previous[-1].iterdir() if f.is_file())
        # fp32 adapter + two fp32 Adam moments, plus tokenizer files (a few MB to ~20 MB).
        return self.trainable_params * 4 * 3 + 32 * 2**20

    def check_disk(self, step: int) -> None:
        need = int(self.estimate_bytes() * 1.1) + DISK_MARGIN
        free = free_bytes(self.folder)
        if free < need:
            raise DiskFullError(self._full_message(step, f"needs ~{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free"))

    def free_space_short(self) -> bool:
        return free_bytes(self.folder) < self.estimate_bytes() + DISK_MARGIN

    def _full_message(self, step: int, detail: str) -> str:
        last, _ = latest_valid_checkpoint(self.folder)
        kept = f"the last good checkpoint {last.name} is intact" if last else "no checkpoint was written yet"
        return f"disk full at {self.folder}: checkpoint-{step} {detail}; {kept}. Free space, then rerun to resume"

    def disk_full(self, step: int) -> DiskFullError:
        shutil.rmtree(self.staging_parent, ignore_errors=True)
        return DiskFullError(self._full_message(step, "could not be written (no space left on device)"))

    def commit(self, step: int, state) -> Path:
        """Strip secrets, write the manifest, fsync, and rename the staged folder into place."""
        staged, final = self.staged(step), self.final(step)
        (staged / PICKLED_ARGS).unlink(missing_ok=True)
        if state.best_model_checkpoint and Path(state.best_model_checkpoint) == staged:
            state.best_model_checkpoint = str(final)
            state.save_to_json(str(staged / "trainer_state.json"))
        files = {}
        for item in sorted(staged.rglob("*")):
            if item.is_file():
                _fsync(item)
                files[str(item.relative_to(staged))] = {"size": item.stat().st_size, "sha256": file_sha256(item)}
        atomic_write_json(staged / MANIFEST, {"loraft_version": __version__, "step": step, "files": files})
        _fsync(staged)
        if final.exists():  # a damaged folder of the same step, skipped on resume: replace it
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync(self.folder)
        shutil.rmtree(self.staging_parent, ignore_errors=True)
        self.rotate(protect=state.best_model_checkpoint)
        return final

    def rotate(self, protect: str | None = None) -> None:
        """Keep the newest `keep` valid checkpoints (and the best one); delete older ones."""
        protected = {Path(protect).resolve()} if protect else set()
        valid = [p for p in list_checkpoints(self.folder) if (p / MANIFEST).is_file()]
        for old in valid[: max(len(valid) - self.keep, 0)]:
            if old.resolve() not in protected:
                shutil.rmtree(old, ignore_errors=True)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Resume: is there an unfinished run of this config, and where does it continue from?

# Keys that may change between an interrupted run and its resume: they change what is logged,
# kept or tolerated, never the numbers a step computes.
SAFE_KEYS = (
    "training.logging_steps",
    "training.report_to",
    "training.save_total_limit",
    "training.save_steps",
    "training.nan_policy",
    "training.max_skipped_steps",
    "advice.off",  # what is advised, not what is trained
)


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None
    skipped: list[CheckpointProblem]

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) if self.checkpoint else 0


def plan_resume(run, cfg, *, explicit: bool) -> ResumePlan | None:
    """None for a fresh run; a plan for an unfinished one. Refuses a changed config, naming the keys."""
    if not run.has_state():
        if explicit:
            raise LoraftError(f"--resume: {run.path} holds no unfinished run; drop --resume to start one")
        return None
    checkpoint, skipped = latest_valid_checkpoint(run.checkpoints)
    if checkpoint is None:
        return ResumePlan(None, skipped)  # nothing to continue: start over in the same folder
    changed = config_changes(run.path / "config.yaml", cfg)
    if changed:
        raise LoraftError(
            f"{run.path} holds an unfinished run with a different config ({', '.join(changed)} changed); "
            f"restore those keys to resume, choose another output_dir, or add --overwrite to discard it"
        )
    return ResumePlan(checkpoint, skipped)


def report_resume(console, run, plan: ResumePlan | None) -> None:
    if plan is None:
        return
    for problem in plan.skipped:
        console.print(f"[yellow]warning:[/] {problem.path.name} is damaged ({problem.reason}); skipped")
    if plan.checkpoint is None:
        console.print(f"{run.path} holds an unfinished run without a complete checkpoint; starting it over")
    else:
        console.print(f"resuming the unfinished run in {run.path} from {plan.checkpoint.name} (step {plan.step})")


def resume_hint(run, command: str) -> str:
    last, _ = latest_valid_checkpoint(run.checkpoints)
    kept = f"{last.name} saved" if last is not None else "no checkpoint saved yet"
    return f"{kept}; resume with: {command} --resume (a plain `{command}` resumes it too)"


def data_hashes(sources: list[dict]) -> dict:
    return {s["role"]: s["sha256"] for s in sources if "sha256" in s}


def check_same_data(run, sources: list[dict]) -> None:
    before = run.read_state().get("data")
    if before is None:  # a run started before data hashes were recorded
        return
    changed = [role for role, digest in data_hashes(sources).items() if before.get(role) != digest]
    if changed:
        raise LoraftError(
            f"data.{changed[0]}: the file changed since the unfinished run in {run.path} started; "
            "restore it to resume, or add --overwrite to start over"
        )


def config_changes(saved_path: Path, cfg) -> list[str]:
    """Dotted keys whose value differs between the saved (redacted) config and `cfg`, safe keys excluded."""
    try:
        saved = load_yaml(Path(saved_path).read_text(encoding="utf-8"), saved_path) or {}
    except (OSError, yaml.YAMLError, LoraftError):
        return ["config.yaml (unreadable)"]
    now = redact(cfg.model_dump(mode="json"))
    before, after = _flatten(saved), _flatten(now)
    safe = set(SAFE_KEYS) | {"output_dir"}  # the folder is the run's identity, wherever it now lives
    for role in ("train", "eval"):  # a moved local data file is fine: train() compares its SHA-256
        source = getattr(cfg.data, role, None) if cfg.data is not None else None
        if source is not None and source.is_local:
            safe.add(f"data.{role}.path")
    if cfg.training.early_stopping_patience is None:
        safe.add("training.eval_steps")  # only early stopping makes evaluation change the result
    return sorted(k for k in before.keys() | after.keys() if k not in safe and before.get(k) != after.get(k))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics records after `step` (they will be logged again); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line torn by the crash
            continue
        if record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
