"""The `loraft` command line: each command picks a library function, calls it, prints its summary.

Each command imports its library inside it, so `loraft --help` is instant (cli.py imports in ~0.04 s): each
such import is marked `# lazy:` with what it would add to every invocation (the config loader: pydantic and
yaml; a verb's stage: torch and transformers, seconds, never paid by a config refused before it). A
`LoraftError` becomes one line on stderr and its exit code (2 for user errors); `--debug` shows
the traceback of anything else (cli_common.py: what every command runs in).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lora_ft import __version__
from lora_ft.artifacts.run_dir import require_new_out
from lora_ft.cli_common import DEBUG, ConfigArg, SetOption, handled, read_config, writer_of
from lora_ft.cli_data import data_app
from lora_ft.errors import LoraftError
from lora_ft.metrics import DEFAULT_MAX_REGRESSION

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Fine-tune causal language models with LoRA and QLoRA from one YAML file.",
)
app.add_typer(data_app, name="data")


def _version(value: bool):
    if value:
        typer.echo(f"loraft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for internal errors (or LORAFT_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    token = DEBUG.set(debug or os.environ.get("LORAFT_DEBUG") == "1")
    ctx.call_on_close(lambda: DEBUG.reset(token))  # this invocation only: the next one starts from False


@app.command()
@handled
def train(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run in output_dir (also automatic); fail if there is none."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the run (finished or not) in output_dir."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Train on N GPUs through accelerate (distributed: section)."),
    cpu: bool = typer.Option(False, "--cpu", help="With --gpus N: run N processes on the CPU (gloo), to test a setup."),
):
    """Train a LoRA/QLoRA adapter as CONFIG describes and write it to output_dir.

    An unfinished run of the same config in output_dir continues from its last complete checkpoint.
    Exit codes: 0 done, 2 bad input, 1 internal error, 130/143 interrupted (Ctrl-C/SIGTERM) after saving.

    Example: loraft train recipes/quickstart.yaml --set training.max_steps=20
    """
    from lora_ft.training.distributed import is_main_process, launch, world_size  # lazy: pydantic, yaml (0.1-0.3 s)

    cfg = read_config(config, set_)  # a typo in the config is refused before anything heavy is imported
    from lora_ft.train import train as run_training  # lazy: pydantic, yaml (0.1-0.3 s)

    if gpus > 1 and world_size() == 1:
        argv = ["train", str(config), *[f"--set={item}" for item in set_ or []]]
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(launch(config, argv, cfg, gpus, cpu=cpu))
    # What the user typed, quoted back in interruption and resume messages.
    launched = ["--gpus", str(world_size())] + ["--cpu"] * cpu if world_size() > 1 else []
    command = shlex.join(["loraft", "train", str(config), *[a for item in set_ or [] for a in ("--set", item)], *launched])
    result = run_training(cfg, resume=resume, overwrite=overwrite, command=command)
    if is_main_process():
        typer.echo(result.summary())


@app.command()
@handled
def validate(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Check as `train --resume` would."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Check as `train --overwrite` would."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON: the config, advice findings with their suggested values, ok."),
):
    """Run train's pre-flight on CONFIG without loading weights (exit 2 exactly when train would refuse it);
    print the resolved config, the estimates, every finding and the advice.

    Example: loraft validate configs/llama8b.yaml
    """
    from lora_ft.config_io import config_to_yaml, redact  # lazy: pydantic, yaml (0.1-0.3 s)
    from lora_ft.train import preflight  # lazy: pydantic, yaml (0.1-0.3 s)

    cfg = read_config(config, set_)
    check = preflight(cfg, resume=resume, overwrite=overwrite, need_data=False)
    if as_json:
        typer.echo(json.dumps({
            "ok": not check.failed,
            "config": redact(cfg.model_dump(mode="json")),
            "trainable_params": check.trainable,
            "advice": check.advice.to_json() if check.advice is not None else None,
            "data_check": check.data_check.to_json() if check.data_check is not None else None,
        }, indent=2))
        check.require_passed(str(config))
        return
    typer.echo(config_to_yaml(cfg).rstrip())
    typer.echo("---")
    typer.echo(check.summary())
    check.require_passed(str(config))
    typer.echo("ok: config is valid")


# ---------------------------------------------------------------------------------------------
# eval, generate, chat: base vs adapter(s), through one loader (generate.load_for_inference)

AdapterOption = typer.Option(None, "--adapter", help="Run folder of a trained adapter (give twice to compare two).")
BaseOption = typer.Option(None, "--base", help="Base model (default: the one the run recorded; a different one is refused).")
ForceOption = typer.Option(False, "--force", help="Use --base even though its weights differ from the recorded base.")


def _metric_option(name: str):
    return typer.Option(None, f"--min-{name}", help=f"Gate: exit 3 if the adapter's {name.replace('-', '_')} is below this.")


@app.command("eval")
@handled
def eval_(
    adapter: Path = typer.Option(..., "--adapter", help="Run folder of the trained adapter."),
    base: Optional[str] = BaseOption,
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Task data with reference answers (default: the run's eval split)."),
    regression: Optional[List[Path]] = typer.Option(
        None, "--regression", help="Base-capability set(s) the adapter must not get worse on (default: loraft's own)."
    ),
    no_regression: bool = typer.Option(False, "--no-regression", help="Skip the regression set."),
    max_regression: Optional[float] = typer.Option(
        None, "--max-regression", help=f"Gate: largest mean per-example loss increase on the regression set, nats/token (default {DEFAULT_MAX_REGRESSION:g})."
    ),
    min_exact_match: Optional[float] = _metric_option("exact-match"),
    min_contains: Optional[float] = _metric_option("contains"),
    min_regex: Optional[float] = _metric_option("regex"),
    min_json_valid: Optional[float] = _metric_option("json-valid"),
    min_json_fields: Optional[float] = _metric_option("json-fields"),
    min_rouge_l: Optional[float] = _metric_option("rouge-l"),
    min_stops: Optional[float] = _metric_option("stops"),
    min_preference_accuracy: Optional[float] = _metric_option("preference-accuracy"),
    regex: Optional[str] = typer.Option(None, "--regex", help="Pattern every answer should match (re.search); rows may carry their own 'regex'."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Default: 16 + twice the longest reference."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward/generate batch."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to create with report.json, report.md and report.png (must not exist)."),
    force: bool = ForceOption,
    full_precision_base: bool = typer.Option(
        False, "--full-precision-base",
        help="Score a QLoRA run on the full-precision base (what merge, export and serve compute on) instead of its 4-bit base as trained.",
    ),
):
    """Compare base and base+adapter on held-out task data and on a regression set; exit 3 when a gate fails.

    Exit codes: 0 all gates passed, 2 bad input (e.g. wrong base), 3 a --min-* or --max-regression gate failed.

    Example: loraft eval --adapter runs/quickstart --min-exact-match 0.9 --min-json-fields 0.95 --out reports/quickstart
    """
    from lora_ft.evaluate import EvalSettings, Gates, evaluate  # lazy: torch (seconds)

    minimums = {
        "exact_match": min_exact_match, "contains": min_contains, "regex": min_regex, "json_valid": min_json_valid,
        "json_fields": min_json_fields, "rouge_l": min_rouge_l, "stops": min_stops,
        "preference_accuracy": min_preference_accuracy,
    }
    gates = Gates(
        {k: v for k, v in minimums.items() if v is not None},
        DEFAULT_MAX_REGRESSION if max_regression is None else max_regression,
    )
    settings = EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, regex=regex)
    if out is not None:
        require_new_out(out)  # before the models load, as merge and export do
    with writer_of(out, "--out", "eval"):
        report = evaluate(
            adapter, base=base, data=data or (), regression=[] if no_regression else (regression or None),
            settings=settings, gates=gates, force=force, full_precision_base=full_precision_base,
        )
        typer.echo(report.summary())
        if out is not None:
            typer.echo(f"report written to {report.write(out)}")
    if not report.passed:
        raise typer.Exit(report.exit_code)


def _generation_settings(max_new_tokens: int, batch_size: int, sample: bool, temperature: float, top_p: float, seed: int):
    from lora_ft.serving.inference import GenerationSettings  # lazy: torch (seconds)

    return GenerationSettings(
        max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed
    )


def _models(adapter: Optional[List[Path]], base: Optional[str], base_only: bool, with_base: bool, force: bool):
    """Load once; return (inference, labels to run) for --adapter [--adapter] / --base-only / --with-base."""
    from lora_ft.serving.inference import BASE, load_for_inference  # lazy: torch (seconds)

    if base_only and with_base:
        raise LoraftError("--base-only and --with-base contradict each other; keep one")
    if sys.stderr.isatty():  # progress on a terminal only: piped, an error stays one line
        typer.echo(f"loading {base or 'the base'}{' and ' + ', '.join(map(str, adapter)) if adapter else ''} ...", err=True)
    inference = load_for_inference([str(a) for a in adapter or []] or None, base, force)
    labels = [BASE] if base_only or not inference.labels else ([BASE] if with_base else []) + inference.labels
    return inference, labels


SampleOption = typer.Option(False, "--sample", help="Sample instead of greedy decoding.")
TemperatureOption = typer.Option(0.7, "--temperature", help="Sampling temperature (with --sample).")
TopPOption = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (with --sample).")
SeedOption = typer.Option(0, "--seed", help="Seed for sampling.")


@app.command()
@handled
def merge(
    adapter: Path = typer.Option(..., "--adapter", help="A finished run folder (or any PEFT LoRA adapter folder)."),
    out: Path = typer.Option(..., "--out", help="Folder to create for the merged model (must not exist)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default: the one recorded in the adapter."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's), bfloat16, float16 or float32."),
    force: bool = typer.Option(False, "--force", help="Merge even if the base is not the adapter's own (recorded)."),
    qlora_base: str = typer.Option(
        "original", "--qlora-base", help="QLoRA adapters: merge into the original weights or the dequantized 4-bit ones (CUDA)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the logits check (the per-module check always runs)."),
):
    """Merge a LoRA adapter into its base: an ordinary model folder that loads without PEFT, verified.

    Example: loraft merge --adapter runs/quickstart --out merged/quickstart
    """
    from lora_ft.merge import merge as run_merge  # lazy: torch (seconds)
    from lora_ft.merge_plan import DTYPES  # lazy: torch (seconds)

    if dtype != "auto" and dtype not in DTYPES:
        raise LoraftError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    with writer_of(out, "--out", "merge"):
        result = run_merge(adapter, out, base=base, dtype=dtype, force=force, qlora_base=qlora_base, verify=not no_verify)
    typer.echo(result.summary())


@app.command("export")
@handled
def export_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished run folder.", show_default=False),
    to: str = typer.Option(..., "--to", help="vllm, sglang, llamacpp, ollama, merged or transformers."),
    out: Path = typer.Option(..., "--out", help="Folder to create (must not exist)."),
):
    """Write what one serving engine loads, normalised to its own rules, and verify it against base+adapter.

    Exit codes: 0 written and verified, 2 bad input (nothing written), 1 verification failed (nothing written).

    Example: loraft export runs/quickstart --to llamacpp --out exports/quickstart-gguf
    """
    from lora_ft.export import export  # lazy: torch (seconds)

    with writer_of(out, "--out", "export"):
        result = export(run_dir, to, out)
    typer.echo(result.summary())


@app.command("inspect")
@handled
def inspect_command(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A run folder (or any PEFT LoRA adapter folder).", show_default=False
    ),
    against: Optional[Path] = typer.Option(None, "--against", help="A second adapter to compare subspaces with."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write inspect.json and PNG charts to this folder."),
    energy: float = typer.Option(0.9, "--energy", help="Share of the squared spectrum that defines effective rank."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for ||W|| (default: the one the run recorded)."),
):
    """Show what an adapter learned per layer and module type, and whether its rank was the right size.

    Example: loraft inspect runs/quickstart --report reports/quickstart
    """
    from lora_ft.rank_diagnostics import inspect_adapter  # lazy: torch (seconds)
    from lora_ft.rank_report import render_summary, write_report  # lazy: torch (seconds)

    result = inspect_adapter(adapter_dir, against=against, base=base, energy=energy)
    if report is not None:
        write_report(result, report)
    typer.echo(render_summary(result))
    if report is not None:
        typer.echo(f"report written to {report}")


@app.command()
@handled
def generate(
    prompts: Path = typer.Option(..., "--prompts", help="JSONL rows with prompt | instruction(+input) | messages."),
    adapter: Optional[List[Path]] = AdapterOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Write JSONL here (default: JSONL on stdout)."),
    base: Optional[str] = BaseOption,
    base_only: bool = typer.Option(False, "--base-only", help="Generate with the base model alone."),
    with_base: bool = typer.Option(False, "--with-base", help="Also generate with the base, side by side."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    sample: bool = SampleOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int = SeedOption,
    force: bool = ForceOption,
):
    """Batched generation for every prompt of a JSONL file, with the run's chat template and stop tokens.

    Example: loraft generate --adapter runs/quickstart --with-base --prompts recipes/data/quickstart_eval.jsonl --out answers.jsonl
    """
    from lora_ft.generate import generate_file  # lazy: torch (seconds)

    if not prompts.is_file():  # before loading any model
        raise LoraftError(f"--prompts: data file not found: {prompts}")
    settings = _generation_settings(max_new_tokens, batch_size, sample, temperature, top_p, seed)
    inference, labels = _models(adapter, base, base_only, with_base, force)
    result = generate_file(inference, prompts, settings, labels=labels, out=out)
    if out is None:
        for row in result.rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        typer.echo(result.summary(), err=True)
    else:
        typer.echo(result.side_by_side())
        typer.echo(result.summary())


@app.command()
@handled
def chat(
    adapter: Optional[List[Path]] = AdapterOption,
    base: Optional[str] = BaseOption,
    base_only: bool = typer.Option(False, "--base-only", help="Chat with the base model alone."),
    with_base: bool = typer.Option(False, "--with-base", help="Each message also goes to the base; answers shown one after the other."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (default: the run's data.system_prompt where training used it: prompt/completion rows, not chat rows)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    sample: bool = SampleOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int = SeedOption,
    force: bool = ForceOption,
):
    """Talk to base+adapter in the terminal, streamed, with the run's saved template. /reset clears, /exit quits.

    Example: loraft chat --adapter runs/quickstart --with-base
    """
    settings = _generation_settings(max_new_tokens, 1, sample, temperature, top_p, seed)
    inference, labels = _models(adapter, base, base_only, with_base, force)
    # Without --system, each model's conversation puts in the system prompt its training used (or none).
    start = [{"role": "system", "content": system}] if system else []
    history = {label: list(start) for label in labels}
    typer.echo(f"chatting with {', '.join(labels)}; /reset clears the history, /exit quits", err=True)
    while True:
        try:
            typer.echo("you> ", nl=False)
            line = input()
        except EOFError:
            typer.echo("")
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = {label: list(start) for label in labels}
            typer.echo("(history cleared)")
            continue
        if not text:
            continue
        for label in labels:
            history[label].append({"role": "user", "content": text})
            typer.echo(f"{label}> ", nl=False)
            reply = ""
            for piece in inference.stream(history[label], settings, label, system=system is None):
                reply += piece
                typer.echo(piece, nl=False)
            typer.echo("")
            history[label].append({"role": "assistant", "content": reply})


@app.command()
@handled
def serve(
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", help="NAME=RUN_DIR: serve the run's adapter as model NAME (repeatable; RUN_DIR alone uses its folder name)."
    ),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the first adapter's recorded base); its name serves it without adapter."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (another than localhost: set --api-key)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LORAFT_API_KEY", show_envvar=True, help="Require Authorization: Bearer KEY on /v1 routes.", show_default=False
    ),
    allow_runtime_lora: bool = typer.Option(
        False, "--allow-runtime-lora", help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's shape)."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens a request may generate (and the default when it does not say)."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Most requests generated together in one batch."),
    queue_size: int = typer.Option(256, "--queue-size", help="Most requests waiting; more get 503 until the queue drains."),
    force: bool = typer.Option(False, "--force", help="Serve an adapter whose base cannot be checked (no manifest.json, its named base not found) or differs."),
):
    """Serve adapters behind an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions).

    The base loads once; requests for different adapters are generated in one batch, each with its own adapter.
    Ctrl-C or SIGTERM stops after the requests in flight (exit 0 on SIGTERM).

    Example: loraft serve --adapter quickstart=runs/quickstart --port 8000
    """
    from lora_ft.serve import ServeSettings, parse_adapters, serve as run_server  # lazy: torch (seconds)

    settings = ServeSettings(
        max_tokens=max_tokens, max_batch_size=max_batch_size, queue_size=queue_size, api_key=api_key,
        allow_runtime_lora=allow_runtime_lora,
    )
    run_server(parse_adapters(adapter or []), base=base, host=host, port=port, settings=settings,
               announce=lambda line: typer.echo(line, err=True), force=force)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
