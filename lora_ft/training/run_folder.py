"""The pre-flight's first stage: can output_dir take this run, and does an unfinished run there resume?

Reads only the folder (no torch, no model, no data rows), so a re-run of a finished run, an output_dir that
holds the run's own inputs, or a resume with a changed config is refused in well under a second. Nothing is
changed here: `--overwrite` discards the old run only once the whole pre-flight has passed (train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_ft.artifacts.checkpoints import ResumePlan, plan_resume
from lora_ft.artifacts.run_dir import RunDir, check_output_path
from lora_ft.config import RunConfig
from lora_ft.errors import ConfigError


@dataclass(frozen=True)
class FolderCheck:
    run: RunDir
    resume: ResumePlan | None  # None: a fresh run (or one --overwrite starts over)
    discards: str | None  # "finished" or "unfinished": the run --overwrite will discard

    def line(self) -> str:
        if self.discards:
            state = f"--overwrite discards the {self.discards} run there"
        elif self.resume is None:
            state = "new run"
        elif self.resume.checkpoint is None:
            state = "unfinished run without a complete checkpoint: starts over"
        else:
            state = f"resumes the unfinished run from {self.resume.checkpoint.name} (step {self.resume.step})"
        return f"output      {self.run.path} ({state})"


def check_run_folder(cfg: RunConfig, *, resume: bool, overwrite: bool, main: bool = True, model_path: Path | None = None) -> FolderCheck:
    """Refuse what train would refuse about output_dir; changes nothing. `model_path`: the resolved base, once known."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other (continue the run, or discard it); keep one")
    check_output_path(Path(cfg.output_dir), input_paths(cfg, model_path))  # before --overwrite could delete any of them
    if not main:  # rank 0 alone prepares the folder; the others only read which checkpoint to resume from
        return FolderCheck(RunDir(Path(cfg.output_dir)), None if overwrite else plan_resume(RunDir(Path(cfg.output_dir)), cfg, explicit=resume), None)
    run = RunDir.check(cfg.output_dir, overwrite=overwrite)
    if overwrite:
        discards = "finished" if run.is_finished() else "unfinished" if run.has_state() else None
        return FolderCheck(run, None, discards)
    return FolderCheck(run, plan_resume(run, cfg, explicit=resume), None)


def input_paths(cfg: RunConfig, model_path: Path | None = None) -> list[Path]:
    """Everything the run reads from local disk; output_dir may not be or contain any of it."""
    model = Path(model_path) if model_path else Path(cfg.model.name).expanduser()  # a Hub id is no local path
    paths = [model] if model_path or model.exists() else []
    for data_source in (cfg.data.train, cfg.data.eval) if cfg.data else ():
        if data_source is not None and data_source.is_local:
            paths.append(Path(data_source.path).expanduser())
    if cfg.model.chat_template and Path(cfg.model.chat_template).expanduser().exists():
        paths.append(Path(cfg.model.chat_template).expanduser())
    return paths
