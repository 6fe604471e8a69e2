"""Hostile and broken inputs (issue 22): serve, the adapter loaders, merge and export fail closed, answer each client
mistake with an OpenAI-shaped 4xx, and leave nothing behind. HTTP goes through the `openai` client and raw sockets
on 127.0.0.1 only; every wait is a bounded loop."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ft.serve import BackgroundServer, ServeSettings, parse_adapters
from lora_ft.errors import LoraftError
from lora_ft.serving.batching import ModelPool

USER = [{"role": "user", "content": "Repeat after me: yes"}]


def copy_run(tiny_run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints")))


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def truncated(tiny_run: Path, folder: Path) -> Path:
    copy_run(tiny_run, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def pickled(tiny_run: Path, folder: Path) -> Path:
    copy_run(tiny_run, folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder


def raw_http(port: int, request: bytes, *, timeout: float = 30) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before reading it all
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def post(path: str, body: bytes) -> bytes:
    return (f"POST /v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def pool(tiny_run):
    return ModelPool.load({"red": tiny_run})


@pytest.fixture(scope="module")
def server(pool):
    with BackgroundServer(pool, ServeSettings(max_tokens=32, allow_runtime_lora=True)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


def load(client, name: str, path: Path) -> str:
    return client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(path)}, cast_to=str)


def answer(client, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=USER, max_tokens=12, temperature=0)
    return reply.choices[0].message.content


# --------------------------------------------------------------------------------------------- 1. all or nothing


def test_a_failed_runtime_load_leaves_the_server_as_before_and_the_name_free(client, server, pool, tiny_run, tmp_path):
    expected = answer(client, "red")
    bad = edit_config(copy_run(tiny_run, tmp_path / "bad"), lora_alpha=64)  # 8x the scale, and (below) a torn lora_B
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key][:, :2].contiguous()
    save_file(weights, bad / "adapter_model.safetensors")
    configs_before = set(pool.model.peft_config)
    with pytest.raises(openai.BadRequestError, match="has rank"):
        load(client, "again", bad)
    assert set(pool.model.peft_config) == configs_before and "again" not in [m.id for m in client.models.list().data]

    assert load(client, "again", tiny_run).startswith("Success")  # the right adapter under the name that failed
    assert float(next(l.scaling["again"] for l in pool.model.modules() if isinstance(getattr(l, "scaling", None), dict)
                      and "again" in l.scaling)) == 2.0  # its own alpha 8 / r 4, not the failed folder's 64 / 4
    assert answer(client, "again") == expected
    client.post("/unload_lora_adapter", body={"lora_name": "again"}, cast_to=str)


def test_a_load_that_fails_inside_peft_is_undone(pool, tiny_run, monkeypatch):
    from lora_ft.artifacts.adapter_run import AdapterRun

    run = AdapterRun.load(tiny_run)
    real = pool.model.load_adapter

    def fails_after_injecting(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("torn read")

    monkeypatch.setattr(pool.model, "load_adapter", fails_after_injecting)
    with pytest.raises(RuntimeError):
        pool.attach("torn", run)
    assert "torn" not in pool.model.peft_config and "torn" not in pool.adapters
    assert not any("torn" in name for name, _ in pool.model.named_parameters())


# --------------------------------------------------------------------------------------------- 2. pickles, 8. damage


def test_pickle_adapter_weights_are_never_read(client, tiny_run, tmp_path, run_cli):
    folder = pickled(tiny_run, tmp_path / "pickled")
    with pytest.raises(openai.BadRequestError, match="adapter_model.bin is a pickle, which loraft never reads"):
        load(client, "pickled", folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for args in (["generate", "--adapter", folder, "--prompts", prompts, "--out", tmp_path / "o.jsonl"],
                 ["eval", "--adapter", folder, "--no-regression"],
                 ["serve", "--adapter", f"p={folder}", "--port", "0"]):
        code, _, err = run_cli(*args)
        assert code == 2 and "is a pickle, which loraft never reads" in err, (args[0], err)


def test_truncated_weights_exit_2_naming_the_file_for_merge_and_eval_and_400_at_run_time(client, tiny_run, tmp_path, run_cli):
    folder = truncated(tiny_run, tmp_path / "torn")
    name = str(folder / "adapter_model.safetensors")
    for args in (["merge", "--adapter", folder, "--out", tmp_path / "m"], ["eval", "--adapter", folder, "--no-regression"]):
        code, _, err = run_cli(*args)
        assert code == 2 and f"{name} is damaged or truncated" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()
    with pytest.raises(openai.BadRequestError, match="is damaged or truncated"):
        load(client, "torn", folder)


def test_an_adapter_folder_without_weights_is_a_400(client, tiny_run, tmp_path):
    folder = copy_run(tiny_run, tmp_path / "empty")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(openai.BadRequestError, match="has no adapter_model.safetensors"):
        load(client, "empty", folder)


# --------------------------------------------------------------------------------------------- 5. names


def test_adapter_names_with_dots_or_path_characters_are_refused_and_loading_keeps_working(client, server, tiny_run, run_cli):
    for name in ("app.v2", "../../etc", "a/b"):
        with pytest.raises(openai.BadRequestError, match="may hold only letters, digits"):
            load(client, name, tiny_run)
    assert load(client, "green", tiny_run).startswith("Success")
    client.post("/unload_lora_adapter", body={"lora_name": "green"}, cast_to=str)
    client.post("/unload_lora_adapter", body={"lora_name": "red"}, cast_to=str)  # the active adapter
    assert load(client, "red", tiny_run).startswith("Success")
    assert answer(client, "red")
    with pytest.raises(LoraftError, match="may hold only"):
        parse_adapters([f"app.v2={tiny_run}"])
    code, _, err = run_cli("serve", "--adapter", f"app.v2={tiny_run}", "--port", "0")
    assert code == 2 and "'app.v2' may hold only letters, digits" in err


# --------------------------------------------------------------------------------------------- 6. foreign base


def test_an_adapter_without_manifest_is_checked_against_the_base_its_config_names(client, tiny_run, other_tiny_model_dir, tiny_model_dir, tmp_path, run_cli):
    foreign = edit_config(copy_run(tiny_run, tmp_path / "foreign"), base_model_name_or_path=str(other_tiny_model_dir))
    (foreign / "manifest.json").unlink()
    with pytest.raises(openai.BadRequestError, match="was trained on another base"):
        load(client, "foreign", foreign)
    nowhere = edit_config(copy_run(foreign, tmp_path / "nowhere"), base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(openai.BadRequestError, match="cannot be found here"):
        load(client, "nowhere", nowhere)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    code, _, err = run_cli("generate", "--adapter", foreign, "--base", tiny_model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert code == 2 and "is not the model this adapter was trained on" in err
    code, _, err = run_cli("generate", "--adapter", nowhere, "--base", tiny_model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert code == 2 and "pass --force" in err
    code, _, _ = run_cli("generate", "--adapter", nowhere, "--base", tiny_model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                         "--force", "--max-new-tokens", "2")
    assert code == 0


# --------------------------------------------------------------------------------------------- 3. cost, 7. client mistakes


def test_request_cost_is_bounded_before_any_work(server, client, monkeypatch):
    from lora_ft.serving.batching import ServedModel

    port = port_of(server)
    with monkeypatch.context() as patched:  # a prompt that cannot fit the context is refused untokenized
        patched.setattr(ServedModel, "render_text", lambda self, text: pytest.fail("tokenized"))
        status, body = raw_http(port, post("/completions", json.dumps({"model": "red", "prompt": "a b " * 200_000}).encode()))
        assert status == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nConnection: close\r\n\r\n")
    status, body = raw_http(port, head + b'{"model": "red", "prompt": "a a a')  # refused on its header, unread
    assert status == 413 and body["error"]["code"] == "request_too_large"
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    piece = b"a " * 50_000
    body_chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(11)) + b"0\r\n\r\n"
    status, body = raw_http(port, chunked + body_chunks)  # no length given: counted as it arrives
    assert status == 413 and body["error"]["code"] == "request_too_large"
    deep = b'{"model": "red", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = raw_http(port, post("/chat/completions", deep))
    assert status == 400 and "nests JSON 100001 levels deep" in body["error"]["message"]
    status, body = raw_http(port, post("/chat/completions", b'{"model": "red", "messages": [{"role": "user", "content": "\\ud800"}]}'))
    assert status == 400 and "lone UTF-16 surrogate" in body["error"]["message"]
    assert answer(client, "red")


def test_a_conversation_the_chat_template_refuses_is_a_400(client, tiny_run, tmp_path):
    strict = copy_run(tiny_run, tmp_path / "strict")
    template = strict / "chat_template.jinja"
    guard = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}"
    if template.is_file():
        template.write_text(guard + template.read_text())
    else:
        config = json.loads((strict / "tokenizer_config.json").read_text())
        config["chat_template"] = guard + config["chat_template"]
        (strict / "tokenizer_config.json").write_text(json.dumps(config))
    assert load(client, "strict", strict).startswith("Success")
    with pytest.raises(openai.BadRequestError, match="Conversations must start with the user"):
        client.chat.completions.create(model="strict", messages=[{"role": "assistant", "content": "hi"}], max_tokens=4)
    assert answer(client, "strict")


# --------------------------------------------------------------------------------------------- 4. hang-ups


def test_a_non_streaming_client_that_hangs_up_has_its_generation_cancelled(server):
    server.scheduler.pause()
    try:
        sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=30)
        sock.sendall(post("/chat/completions", json.dumps({"model": "red", "messages": USER, "max_tokens": 32}).encode()))
        deadline = time.monotonic() + 30
        while server.scheduler.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        job = next(item for item in server.scheduler._queue if hasattr(item, "cancelled"))
        assert not job.cancelled
        sock.close()  # the client hangs up before its answer is ready
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.cancelled
    finally:
        server.scheduler.pause(False)


# --------------------------------------------------------------------------------------------- 9. leftovers


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_killed_writers_hidden_partial_folder_is_removed_by_the_next_run_on_the_same_out(command, tiny_run, tmp_path, run_cli):
    out = tmp_path / "out"
    old, dead = tmp_path / ".out.k3j2h1.partial", tmp_path / f".out.{2**31 - 7}-x9.partial"
    for leftover in (old, dead):
        leftover.mkdir()
        (leftover / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 100)
    args = ["merge", "--adapter", tiny_run, "--out", out] if command == "merge" else ["export", tiny_run, "--to", "vllm", "--out", out]
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []
    assert f"removed {dead.name}" in err and f"removed {old.name}" in err


def test_a_slow_prompt_never_stalls_health_or_other_clients(server, client, monkeypatch):
    from lora_ft.serving.batching import ServedModel

    real = ServedModel.render_text

    def slow(self, text):
        time.sleep(2.0)  # a 10 MB prompt's tokenization, in miniature
        return real(self, text)

    monkeypatch.setattr(ServedModel, "render_text", slow)
    import threading

    worker = threading.Thread(target=lambda: client.completions.create(model="red", prompt="hello", max_tokens=2))
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    status, body = raw_http(port_of(server), b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    waited = time.monotonic() - started
    worker.join(30)
    assert status == 200 and body == {"status": "ok"} and waited < 1.0


def test_our_own_bug_is_a_500_with_a_trace_id_that_the_log_carries(client, monkeypatch, caplog):
    from lora_ft import serve as serve_module

    monkeypatch.setattr(serve_module, "chat_completion", lambda job, model: 1 / 0)
    with caplog.at_level("ERROR", logger="loraft.serve"), pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="red", messages=USER, max_tokens=2)
    trace = failed.value.body["message"].split("trace id ")[1].split(")")[0]
    assert failed.value.status_code == 500 and failed.value.body["code"] == "internal_error"
    assert any(trace in record.getMessage() and record.exc_info for record in caplog.records)
