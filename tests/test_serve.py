"""`loraft serve`: the OpenAI API over one base and many adapters, checked with the real `openai` client.

The isolation claim is checked the strong way: responses to concurrent requests for three adapters and the
base, batched together, are compared with what `loraft generate` gives for each adapter loaded alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from conftest import hide_cuda
from lora_ft.errors import LoraftError
from lora_ft.serving.inference import GenerationSettings, load_for_inference
from lora_ft.serve import BackgroundServer, ServeSettings, parse_adapters
from lora_ft.serving.batching import ModelPool

MAX_TOKENS = 12
WORDS = ["yes", "no", "maybe", "fox", "dog", "paris", "hello", "world"]
PROMPTS = [f"Repeat after me: {w}" for w in WORDS] + [
    "What is the capital of France?", "a b c", "Hello world!", "the quick brown fox jumps over the lazy dog",
    "convert this request to json title day time place: lunch friday 13:00 home", "yes no maybe", "0 1 2 3", "z",
]


def random_b_copy(run: Path, out: Path, seed: int) -> Path:
    """A copy of a run folder whose LoRA B matrices are random (seeded): another adapter on the same base."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out)
    weights = load_file(out / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(weights, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module", autouse=True)
def _on_the_cpu():
    """The pool and the references run on the CPU, where a batch computes each row exactly as alone. On a GPU,
    cuBLAS picks its kernel by batch size: the last bits differ, and the random tiny models' near-tied greedy
    tokens flipped on an H200 with the right adapter served. GPU serving speed: scripts/bench_serve.py."""
    with pytest.MonkeyPatch.context() as patch:
        hide_cuda(patch)
        yield


@pytest.fixture(scope="module")
def adapters(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_adapters")
    return {"copy": tiny_run, "red": random_b_copy(tiny_run, root / "red", 1), "blue": random_b_copy(tiny_run, root / "blue", 2)}


@pytest.fixture(scope="module")
def pool(adapters):
    return ModelPool.load(adapters)


@pytest.fixture(scope="module")
def server(pool):
    with BackgroundServer(pool, ServeSettings(max_tokens=64, allow_runtime_lora=True)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def reference_chat(run_dir: Path | None, base: str | None, prompts, max_new_tokens=MAX_TOKENS):
    """What `loraft generate` gives: the adapter loaded alone (or the base alone), batched greedy decoding."""
    inference = load_for_inference(run_dir, base)
    label = inference.labels[0] if inference.labels else "base"
    ids = [inference.render([{"role": "user", "content": p}], label) for p in prompts]
    return inference.generate(ids, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=8), label, progress=False)


@pytest.fixture(scope="module")
def references(adapters, pool, tiny_model_dir):
    refs = {name: reference_chat(path, None, PROMPTS) for name, path in adapters.items()}
    refs[pool.base.name] = reference_chat(None, str(tiny_model_dir), PROMPTS)
    return refs


def test_models_lists_the_base_and_every_adapter_by_name(client, pool, tiny_model_dir):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [str(tiny_model_dir), "copy", "red", "blue"]
    assert pool.base.name == str(tiny_model_dir)
    assert models["red"].model_extra["parent"] == str(tiny_model_dir)
    copy = pool.get("copy")  # each adapter is prompted and stopped as its run was trained
    assert copy.tokenizer.chat_template == (copy.path / "chat_template.jinja").read_text()
    assert copy.stop_ids == {copy.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_64_concurrent_requests_over_three_adapters_and_the_base_equal_each_adapter_alone(server, references, pool):
    names = [pool.base.name, "copy", "red", "blue"]
    # The four models answer differently, so a request served with the wrong adapter would show.
    assert all(len({references[n][i].text for n in names}) >= 3 for i in range(len(PROMPTS)))
    requests = [(names[i % 4], i % len(PROMPTS)) for i in range(64)]

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        calls = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[p]}],
                                                max_tokens=MAX_TOKENS, temperature=0) for name, p in requests]
        try:
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    before = len(server.scheduler.batches)
    answers = asyncio.run(ask_all())
    for (name, p), answer in zip(requests, answers):
        expected = references[name][p]
        choice = answer.choices[0]
        assert (answer.model, choice.message.content, answer.usage.completion_tokens) == (name, expected.text, expected.new_tokens)
        assert choice.finish_reason == ("stop" if expected.stopped else "length")
    batches = list(server.scheduler.batches)[before:]
    assert sum(len(b) for b in batches) == 64
    assert max(len(set(b)) for b in batches) == 4, "rows of all four models shared a batch"


def test_a_streamed_chat_reply_is_the_whole_reply_in_pieces(client, references, pool):
    stream = client.chat.completions.create(
        model="red", messages=[{"role": "user", "content": PROMPTS[4]}], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    expected = references["red"][4]
    assert "".join(pieces) == expected.text and len([p for p in pieces if p]) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("stop" if expected.stopped else "length")
    assert chunks[-1].usage.completion_tokens == expected.new_tokens
    alone = client.chat.completions.create(model=pool.base.name, messages=[{"role": "user", "content": PROMPTS[4]}],
                                           max_tokens=MAX_TOKENS, temperature=0)  # a batch of the base alone
    assert alone.choices[0].message.content == references[pool.base.name][4].text


def test_completions_continue_the_raw_prompt_as_generate_does_without_a_template(client, pool):
    from lora_ft.serving.inference import generate_batched

    served = pool.get("blue")
    prompts = ["the quick brown", "a b c d"]
    answer = client.completions.create(model="blue", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    ids = [served.conversation.prompt_ids([{"role": "prompt", "content": p}]) for p in prompts]
    inference = load_for_inference(served.path)
    with inference.use(inference.labels[0]):
        expected = generate_batched(inference.model, served.tokenizer, ids, GenerationSettings(max_new_tokens=MAX_TOKENS),
                                    eos_ids=sorted(served.stop_ids), progress=False)
    assert [c.text for c in answer.choices] == [e.text for e in expected]
    assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
    streamed = client.completions.create(model="blue", prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected[0].text


def test_a_stop_string_ends_the_reply_before_it(client, references):
    full = references["red"][0].text
    assert len(full) > 3
    stop = full[2:4]
    answer = client.chat.completions.create(model="red", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def _post(url: str, body: bytes, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_requests_get_openai_shaped_4xx_errors_and_the_server_keeps_serving(client, server):
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="green", messages=user, max_tokens=4)
    assert unknown.value.body["code"] == "model_not_found" and "'green' does not exist" in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens: 65 is more than this server allows"):
        client.chat.completions.create(model="red", messages=user, max_tokens=65)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="red", messages=[{"role": "user", "content": "a b " * 300}], max_tokens=60)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="logprobs: unknown or unsupported field"):
        client.chat.completions.create(model="red", messages=user, max_tokens=4, logprobs=True)
    with pytest.raises(openai.BadRequestError, match=r"messages\.0\.role"):
        client.chat.completions.create(model="red", messages=[{"role": "robot", "content": "hi"}], max_tokens=4)
    status, body = _post(f"{server.url}/chat/completions", b'{"model": "red", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "not valid JSON" in body["error"]["message"]
    unlimited = client.chat.completions.create(model="red", messages=user, temperature=0)  # no max_tokens: the server's
    assert unlimited.choices[0].finish_reason and unlimited.usage.completion_tokens <= 64


def test_adapters_load_and_unload_at_run_time_and_a_wrong_base_is_refused(client, server, tiny_run, tmp_path, pool):
    green = random_b_copy(tiny_run, tmp_path / "green", 3)
    assert client.post("/load_lora_adapter", body={"lora_name": "green", "lora_path": str(green)}, cast_to=str).startswith("Success")
    assert "green" in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(model="green", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == reference_chat(green, None, [PROMPTS[1]])[0].text

    with pytest.raises(openai.BadRequestError, match="already loaded"):
        client.post("/load_lora_adapter", body={"lora_name": "green", "lora_path": str(green)}, cast_to=str)
    foreign = tmp_path / "foreign"
    shutil.copytree(green, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["base_model"]["fingerprint"] = "lf1:" + "0" * 32
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(openai.BadRequestError, match="was trained on another base"):
        client.post("/load_lora_adapter", body={"lora_name": "foreign", "lora_path": str(foreign)}, cast_to=str)
    with pytest.raises(openai.BadRequestError, match="lora_path: .* is not a folder"):
        client.post("/load_lora_adapter", body={"lora_name": "gone", "lora_path": str(tmp_path / "none")}, cast_to=str)

    assert client.post("/unload_lora_adapter", body={"lora_name": "green"}, cast_to=str).startswith("Success")
    assert "green" not in pool.model.peft_config
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="green", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="is not loaded"):
        client.post("/unload_lora_adapter", body={"lora_name": "green"}, cast_to=str)


def test_api_key_runtime_loading_off_and_a_full_queue_answers_503(pool):
    settings = ServeSettings(max_tokens=16, queue_size=2, api_key="s3cret")
    with BackgroundServer(pool, settings) as restricted:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=restricted.url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=restricted.url, api_key="s3cret", max_retries=0, timeout=60)
        with pytest.raises(openai.NotFoundError, match="--allow-runtime-lora"):
            client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "y"}, cast_to=str)

        restricted.scheduler.pause()
        answers = []
        ask = lambda: answers.append(client.chat.completions.create(model="red", messages=[{"role": "user", "content": "hi"}], max_tokens=4))
        waiting = [threading.Thread(target=ask) for _ in range(2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 30
        while restricted.scheduler.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as full:
            client.chat.completions.create(model="red", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert full.value.status_code == 503 and full.value.body["code"] == "queue_full"
        restricted.scheduler.pause(False)
        for thread in waiting:
            thread.join(30)
        assert len(answers) == 2


def test_serve_refuses_an_adapter_trained_on_another_base(adapters, tiny_run, other_tiny_model_dir, run_cli, tmp_path):
    code, _, err = run_cli("serve", "--adapter", f"copy={tiny_run}", "--base", other_tiny_model_dir, "--port", "0")
    assert code == 2 and "is not the model this adapter was trained on" in err
    foreign = shutil.copytree(adapters["red"], tmp_path / "foreign")
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["base_model"]["fingerprint"] = "lf1:" + "0" * 32
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraftError, match="adapter 'foreign': .* was trained on another base"):
        ModelPool.load({"copy": tiny_run, "foreign": foreign})


def test_adapter_flags_parse_names_and_refuse_duplicates():
    assert parse_adapters(["a=runs/x", "runs/quickstart"]) == {"a": Path("runs/x"), "quickstart": Path("runs/quickstart")}
    with pytest.raises(LoraftError, match="the name 'a' is given twice"):
        parse_adapters(["a=runs/x", "a=runs/y"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tiny_run):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_ft", "serve", "--adapter", f"copy={tiny_run}", "--port", str(port), "--max-tokens", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 180  # a cold start (torch, transformers, peft) on 2 busy cores
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "no start"
                time.sleep(0.2)
        stream = client.completions.create(model="copy", prompt="the quick brown", max_tokens=400, temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] in ("stop", "length")
        assert process.wait(30) == 0
        said = process.stdout.read()
        assert "stopped serving" in said and "copy at http://127.0.0.1" in said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bench_serve_smoke_run_measures_both_ways_of_batching(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve_smoke.json"
    result = bench.main(["--shape", "tiny", "--requests", "8", "--max-tokens", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    mixed, single = result["runs"]["mixed"], result["runs"]["one_at_a_time"]
    assert (mixed["batches"], single["batches"]) == (1, 4), "8 requests over 4 models: one mixed batch, or one batch per model"
    assert (mixed["most_models_in_a_batch"], single["most_models_in_a_batch"]) == (4, 1)
    assert mixed["generated_tokens"] == single["generated_tokens"] > 0
    assert result["same_text_in_both_runs"] == "8/8" and result["via"] == "http"
    direct = bench.main(["--shape", "tiny", "--requests", "4", "--max-tokens", "2", "--via", "direct"])
    assert (direct["runs"]["mixed"]["batches"], direct["runs"]["one_at_a_time"]["batches"]) == (1, 4)
    assert direct["runs"]["mixed"]["generated_tokens"] == direct["runs"]["one_at_a_time"]["generated_tokens"] > 0
