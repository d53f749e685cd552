"""
Tests for serve.py: a real server process on a free loopback port, driven by the official `openai`
client (a test-only dependency) and by raw HTTP for the errors.

Run: python -m pytest -q tests/test_serve.py

Reference: greedy text from model.generate on the same checkpoint (the batched, static-cache
engine must give the same tokens as batch-1 decoding, tests/test_batch.py). Every wait is bounded.
"""

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from data.chat import chat_prompt
from helpers import run_script
from model import Nemotron, NemotronConfig

openai = pytest.importorskip("openai")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=64, pattern="M*-E", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
            mamba_head_dim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)


def start(out_dir, *flags):
    """serve.py on a free port: (process, port), once it prints its address (60 s at most)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "serve.py", f"--init_from={out_dir}", "--port=0", "--device=cpu", *flags],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if select.select([p.stdout], [], [], 1.0)[0]:
            line = p.stdout.readline()
            if line.startswith("serving"):
                return p, int(line.split("http://127.0.0.1:")[1].split()[0])
            if not line:
                break
    p.kill()
    raise AssertionError(f"serve.py did not start: {p.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = NemotronConfig(**TINY)
    torch.save({"model": Nemotron(cfg).state_dict(), "model_config": cfg.to_dict(), "config": {"dataset": "none"}},
               root / "ckpt.pt")
    (root / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256}))
    return root


@pytest.fixture(scope="module")
def server(ckpt):
    p, port = start(ckpt, "--max_batch=2", "--max_len=256", "--queue_size=16")
    yield port
    p.kill()
    p.wait(10)


def greedy_text(ckpt, text, n):
    model = Nemotron.from_pretrained(str(ckpt)).eval()
    ids = list(text.encode())
    new = model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    return bytes(new).decode("utf-8", errors="replace")


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)


def post(port, path, body, raw=None):
    """(status, parsed JSON) of a POST with a JSON body (or raw bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Length": str(len(data))})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"null")


def test_openai_client_completions_chat_and_streams(ckpt, server):
    oa = client(server)
    assert [m.id for m in oa.models.list().data] == [ckpt.name]
    got = oa.completions.create(model=ckpt.name, prompt="def f(x):", max_tokens=8, temperature=0)
    assert got.choices[0].text == greedy_text(ckpt, "def f(x):", 8) and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == 9 and got.usage.completion_tokens == 8
    chunks = oa.completions.create(model=ckpt.name, prompt="def f(x):", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "2+2?"}]
    chat = oa.chat.completions.create(model=ckpt.name, messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == greedy_text(ckpt, chat_prompt(messages), 6)
    stream = oa.chat.completions.create(model=ckpt.name, messages=messages, max_tokens=6, temperature=0, stream=True)
    parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream]
    assert "".join(p for p, _ in parts) == chat.choices[0].message.content and parts[-1][1] == "length"


def test_concurrent_requests_join_the_running_batch(ckpt, server):
    """Six requests on two rows: all complete, each with its own greedy text; a stop string ends one."""
    prompts = [f"x = {i} * " * (i + 1) for i in range(6)]
    out = [None] * 6

    def ask(i):
        out[i] = client(server).completions.create(model="m", prompt=prompts[i], max_tokens=5 + i, temperature=0)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, r in enumerate(out):
        assert r is not None and r.choices[0].text == greedy_text(ckpt, prompts[i], 5 + i)
    full = out[5].choices[0].text
    stop = full[3:5]
    cut = client(server).completions.create(model="m", prompt=prompts[5], max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, "top_k"),
    ("/v1/completions", {"prompt": "x" * 300}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, "prompt"),
    ("/v1/completions", {"prompt": 7}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "tempreature": 0}, "tempreature"),
    ("/v1/chat/completions", {"prompt": "x"}, "prompt"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning": "maybe"}, "reasoning"),
    ("/v1/completions", [1, 2], None),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_400(server, path, body, param):
    status, reply = post(server, path, body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
    assert reply["error"]["param"] == param and reply["error"]["message"]


def test_malformed_http_and_the_server_lives_on(server):
    for raw in (b"{bad", b"\xff\xfe", b'{"prompt": "x", "temperature": NaN}'):
        status, reply = post(server, "/v1/completions", None, raw=raw)
        assert status == 400 and "error" in reply
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:  # no Content-Length
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b"411 Length Required")
    assert post(server, "/v1/nothing", {"prompt": "x"})[0] == 404
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    c.request("GET", "/health")
    assert json.loads(c.getresponse().read())["status"] == "ok"
    assert client(server).completions.create(model="m", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def health(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def test_a_full_queue_answers_503_and_a_gone_client_frees_its_row(ckpt):
    """One row, one queue place: a long streaming request holds the row, a second waits, a third is
    refused (503). The first client then disconnects: its row is freed, and the second completes
    (the first alone would hold the row for minutes)."""
    p, port = start(ckpt, "--max_batch=1", "--queue_size=1", "--max_len=100000")
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        body = json.dumps({"prompt": "a", "max_tokens": 99000, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.0 200")  # streaming: the row is taken
        second = {}
        waiter = threading.Thread(target=lambda: second.update(r=post(port, "/v1/completions",
                                                                       {"prompt": "b", "max_tokens": 3})))
        waiter.start()
        deadline = time.time() + 30
        while health(port)["queued"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        status, reply = post(port, "/v1/completions", {"prompt": "c", "max_tokens": 3})
        assert status == 503 and reply["error"]["type"] == "server_error"
        s.close()  # the streaming client goes away
        waiter.join(60)
        assert second["r"][0] == 200 and second["r"][1]["usage"]["completion_tokens"] == 3
        assert health(port)["busy_rows"] == 0
    finally:
        p.kill()
        p.wait(10)


def test_bad_flags_exit_cleanly(ckpt, tmp_path):
    for args, code, words in [(["--init_from=/no/such/dir"], 1, "no such file or folder"),
                              ([f"--init_from={ckpt}", "--port=70000"], 2, "port"),
                              ([f"--init_from={ckpt}", "--max_batch=0"], 2, "max_batch"),
                              ([f"--init_from={ckpt}", "--device=cuda:7"], 1, "no such device"),
                              ([f"--init_from={tmp_path}"], 1, str(tmp_path))]:
        p = run_script("serve.py", *args)
        assert p.returncode == code and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
