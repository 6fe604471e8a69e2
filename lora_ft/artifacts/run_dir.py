"""The run folder: what a run writes, written so that nothing is ever half-written.

Layout of `output_dir` (the adapter at the top level so `PeftModel.from_pretrained(base, dir)` works):
    adapter_config.json, adapter_model.safetensors   the PEFT adapter
    tokenizer files, chat_template.jinja              the tokenizer exactly as trained
    config.yaml                                       the resolved config, secrets redacted
    manifest.json                                     versions, base fingerprint, data hashes, metrics;
                                                      written last: its presence means "finished"
    metrics.jsonl, loss_curve.png, README.md          per-step metrics, the curve, a model card
    checkpoints/checkpoint-N/                         Trainer checkpoints for resume
Every file is written to a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora_ft.errors import LoraftError

MANIFEST = "manifest.json"
STATE = "run_state.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `final`, on any error remove it."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise LoraftError(f"{final} already exists; choose another path or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(final)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def partial_dir(final: Path) -> Path:
    """A private staging folder beside `final`, named after it and this process: `.NAME.PID-RANDOM.partial`."""
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".partial", dir=final.parent))


def remove_leftovers(final: Path, *, owner: bool = False) -> list[Path]:
    """Remove the staging folders a killed writer left beside `final`; return them. A folder is a leftover when
    the process named in it is gone, or, for `owner` (this process holds the lock on `final`), always."""
    final = Path(final).expanduser()
    removed = []
    if not final.parent.is_dir():
        return removed
    for item in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        pid = item.name[len(final.name) + 2 :].split("-", 1)[0]
        if item.is_dir() and (owner or (pid.isdigit() and not _alive(int(pid)))):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_new_out(out: Path) -> Path:
    """The one --out rule of eval, merge and export: the folder must not exist yet (nothing is ever replaced);
    checked before anything heavy loads."""
    out = Path(out).expanduser()
    if out.exists():
        raise LoraftError(f"--out: {out} already exists; choose another folder or remove it")
    return out


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraftError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraftError(f"{path}: not valid JSON ({exc})") from None


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """output_dir must not be, or contain, anything the run reads (--overwrite would delete it)."""
    output = Path(output).expanduser().resolve()
    for item in inputs:
        item = Path(item).expanduser().resolve()
        if item == output or output in item.parents:
            raise LoraftError(f"output_dir {output} contains the run's input {item}; choose an output_dir outside it")


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` is, or can be created as, a folder this process can write in; else one line naming the obstacle.

    Probes by creating (and removing) a temporary folder in the nearest existing ancestor: permission bits
    do not tell the whole story (root, read-only mounts, /sys)."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise LoraftError(f"{what} {folder} is a file; choose a folder path")
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LoraftError(f"{what} {folder}: {ancestor} is a file, not a folder; choose a path outside it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".loraft-probe.", dir=ancestor))
    except OSError as exc:
        raise LoraftError(f"{what} {folder}: cannot write in {ancestor} ({exc.strerror}); choose a folder you can write") from None


class RunDir:
    """One run's output folder."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()

    @classmethod
    def prepare(cls, output_dir: str | Path, *, overwrite: bool = False) -> "RunDir":
        """Check output_dir can take this run; with `overwrite`, discard a run (finished or not) already there."""
        run = cls.check(output_dir, overwrite=overwrite)
        if overwrite and (run.is_finished() or run.has_state()):
            shutil.rmtree(run.path)
        return run

    @classmethod
    def check(cls, output_dir: str | Path, *, overwrite: bool = False) -> "RunDir":
        """Whether output_dir can take this run, changing nothing (what the pre-flight asks before anything heavy)."""
        run = cls(Path(output_dir).expanduser())
        if run.path.exists() and not run.path.is_dir():
            raise LoraftError(f"output_dir {run.path} is a file; choose a folder path")
        if run.is_finished() and not overwrite:
            raise LoraftError(f"output_dir {run.path} holds a finished run; choose another output_dir or pass --overwrite")
        if not (run.is_finished() or run.has_state()) and run.path.exists() and any(run.path.iterdir()):
            raise LoraftError(f"output_dir {run.path} is not empty and holds no loraft run; choose another folder")
        return run

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # --- state --------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def is_finished(self) -> bool:
        return self.manifest_path.is_file()

    def has_state(self) -> bool:
        return (self.path / STATE).is_file()

    def read_state(self) -> dict:
        return read_json(self.path / STATE)

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.path / STATE, state)

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write_text(target, text)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        target = self.path / name
        atomic_write_json(target, data)
        return target

    def install(self, staged: Path) -> list[str]:
        """Move every file of a staged folder into the run folder (each move is an atomic rename)."""
        names = []
        for item in sorted(Path(staged).iterdir()):
            target = self.path / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            names.append(item.name)
        return names

    def staging(self) -> Path:
        stage = self.path / ".staging"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        return stage
