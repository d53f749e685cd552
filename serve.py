"""
serve.py: an OpenAI-compatible HTTP server with continuous batching. Read after generate.py.

    python serve.py --init_from=out                          # http://127.0.0.1:8000
    python serve.py --init_from=hf_folder --port=8080 --max_batch=16 --compile=True

Endpoints: POST /v1/completions, POST /v1/chat/completions (data/chat.py's format and reasoning
switch: "/think" or "/no_think" in the system prompt, or our extra field "reasoning": "on"/"off"),
either with "stream": true for server-sent events; GET /v1/models; GET /health.

Continuous batching: one thread owns the model and a generate.Engine of max_batch rows. Each HTTP
request (a thread of its own) checks its input, puts a Job on a bounded queue and reads its tokens
back from the job's own queue. Between two decode steps the engine thread takes queued jobs into
free rows (a prefill each); a request that ends frees its row at once, and a client that goes away
mid-stream frees it at the next step. A full queue answers 503; bad input 400 with an
OpenAI-style error object; nothing a request sends can stop the server or the batch it shares.
Standard library only (http.server, threading, queue, json).
"""
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from checkpoint import CheckpointError, load_for_inference
from data.chat import ChatError, chat_prompt, chat_template
from data.tokenizer import DataError, TextStream
from generate import Engine, Request
from hardware import pick_device, pick_dtype

# -----------------------------------------------------------------------------
init_from = 'out'         # a train.py out_dir, a ckpt.pt, or a Hugging Face NemotronH folder
host = '127.0.0.1'        # the address to listen on ('0.0.0.0': every interface)
port = 8000               # 0: any free port (printed at start)
max_batch = 8             # rows decoded together: requests beyond them wait in the queue
max_len = 1024            # prompt + completion tokens per request (the static caches' length)
queue_size = 64           # requests waiting for a row; one more is answered 503
default_max_tokens = 256  # completion length when a request gives no max_tokens
compile = False           # the one-token step through torch.compile (CUDA graphs on a GPU)
seed = 1337               # torch seed; a request's own "seed" seeds its sampling
device = 'auto'           # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'            # 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', 'bfloat16'
config_ranges = dict(port='int [0, 65535]', max_batch='int [1, 1024]', max_len='int [2, inf)',
                     queue_size='int [1, inf)', default_max_tokens='int [1, inf)', seed='[0, inf)')
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

MAX_BODY = 1 << 20  # bytes of JSON a request may send


class BadRequest(Exception):
    """Answered 400 with an OpenAI-style error naming the field (param)."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One HTTP request's work: its engine Request, the text stops it ends at, and the queue the
    engine thread fills with ("tokens", [ids]) and finally ("done", finish reason) or ("error", why)."""
    request: Request
    stops: list
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client went away: the engine thread frees its row


# -----------------------------------------------------------------------------
# the engine thread: continuous batching


def engine_loop(engine, waiting):
    """Forever: take waiting jobs into free rows, then one decode step for every busy row, and
    pass each job its new tokens. Runs in one thread, the only one that touches the model."""
    jobs = {}  # id(request) -> (job, tokens sent)

    def report(key):  # the job's new tokens, and its end
        job, sent = jobs[key]
        r = job.request
        if len(r.tokens) > sent:
            job.events.put(('tokens', r.tokens[sent:]))
            jobs[key] = (job, len(r.tokens))
        if r.finish is not None:
            job.events.put(('error', r.error) if r.finish == 'error' else ('done', r.finish))
            del jobs[key]

    while True:
        for job, _ in list(jobs.values()):
            if job.cancelled:
                engine.release(job.request)
                del jobs[id(job.request)]
        new = []  # as many waiting jobs as there are free rows, prefilled together
        while len(new) < len(engine.free_rows()):
            try:  # with nothing to decode, wait for work; else only take what is there
                job = waiting.get(timeout=1.0) if not jobs and not new else waiting.get_nowait()
            except queue.Empty:
                break
            if not job.cancelled:
                new.append(job)
        try:
            engine.add_many([job.request for job in new])
            added = new
        except Exception:  # one of them fails (e.g. out of memory in its prefill): each alone, to find it
            added = []
            for job in new:
                try:
                    if not any(r is job.request for r in engine.requests):  # not prefilled before the failure
                        engine.add(job.request)
                    added.append(job)
                except Exception as e:
                    job.events.put(('error', f"{type(e).__name__}: {e}"))
        for job in added:
            jobs[id(job.request)] = (job, 0)
            report(id(job.request))  # its first token, from the prefill, goes out now
        try:
            engine.step()
        except Exception as e:  # the step itself failed: every busy request gets the error, rows are freed
            for job, _ in jobs.values():
                engine.release(job.request)
                job.request.finish, job.request.error = 'error', f"{type(e).__name__}: {e}"
        for key in list(jobs):
            report(key)


# -----------------------------------------------------------------------------
# requests: what OpenAI's API takes, checked field by field

COMMON = {'model', 'max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop', 'stream', 'n', 'user',
          'stream_options', 'presence_penalty', 'frequency_penalty', 'logprobs'}
FIELDS = {'/v1/completions': COMMON | {'prompt', 'echo'},
          '/v1/chat/completions': COMMON | {'messages', 'reasoning', 'max_completion_tokens'}}


def not_a_number(word):
    raise BadRequest(f"{word} is not a JSON number")


def number(body, name, default, low, high, whole=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not low <= v <= high:
        kind = 'a whole number' if whole else 'a number'
        raise BadRequest(f"{name}: expected {kind} in [{low}, {high}], got {v!r}", name)
    return v


def parse(path, body, tokenizer, template, context):
    """The Job a request body asks for (or BadRequest), and whether it streams."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS[path])
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", unknown[0])
    if not isinstance(body.get('model', ''), str):
        raise BadRequest("model: expected a string", 'model')
    if number(body, 'n', 1, 1, 1, whole=True) != 1 or body.get('echo') or body.get('logprobs'):
        raise BadRequest("n > 1, echo and logprobs are not supported")
    for name in ('presence_penalty', 'frequency_penalty'):
        if number(body, name, 0, -2, 2) != 0:
            raise BadRequest(f"{name}: only 0 is supported", name)
    stream = body.get('stream', False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false", 'stream')
    if path == '/v1/completions':
        prompt = body.get('prompt')
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise BadRequest("prompt: expected a string, or a list of token ids", 'prompt')
    else:
        try:
            ids = tokenizer.encode(chat_prompt(body.get('messages'), body.get('reasoning'), template))
        except ChatError as e:
            raise BadRequest(str(e), 'reasoning' if 'reasoning=' in str(e) else 'messages') from None
    if not ids:
        raise BadRequest("the prompt is empty", 'prompt')
    if not all(0 <= t < tokenizer.vocab_size for t in ids):
        raise BadRequest(f"prompt: token ids must lie in [0, {tokenizer.vocab_size})", 'prompt')
    room = context - len(ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(ids)} tokens: the context is {context}", 'prompt')
    name = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = number(body, name, min(default_max_tokens, room), 1, room, whole=True)
    stops = body.get('stop') or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop: a string or a list of at most 4 non-empty strings", 'stop')
    r = Request(ids, max_tokens, temperature=number(body, 'temperature', 1.0, 0, 2),
                top_k=number(body, 'top_k', None, 1, 1 << 30, whole=True),
                top_p=number(body, 'top_p', None, 1e-9, 1), seed=number(body, 'seed', None, 0, 2**63 - 1, whole=True),
                stop=() if tokenizer.eot is None else (tokenizer.eot,))
    if r.top_p == 1:
        r.top_p = None
    return Job(r, stops), stream


# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = 'nanoNemotron'
    app = None  # the App below, set before serving

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does, but quieter
        if self.app.verbose:
            super().log_message(format, *args)

    def send_json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, code, message, kind='invalid_request_error', param=None):
        self.send_json(code, {'error': {'message': message, 'type': kind, 'param': param, 'code': None}})

    def do_GET(self):
        if self.path == '/health':
            self.send_json(200, {'status': 'ok', 'busy_rows': self.app.busy(), 'queued': self.app.waiting.qsize()})
        elif self.path == '/v1/models':
            self.send_json(200, {'object': 'list', 'data': [{'id': self.app.name, 'object': 'model',
                                                             'created': self.app.started, 'owned_by': 'nanoNemotron'}]})
        else:
            self.send_error_json(404, f"no route {self.path}", 'not_found_error')

    def do_POST(self):
        if self.path not in FIELDS:
            return self.send_error_json(404, f"no route {self.path}", 'not_found_error')
        try:
            length = int(self.headers.get('Content-Length', ''))
        except ValueError:
            return self.send_error_json(411, "a Content-Length header is required")
        if not 0 < length <= MAX_BODY:
            return self.send_error_json(413 if length > MAX_BODY else 400, f"the body must be 1 .. {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length), parse_constant=not_a_number)
            job, stream = parse(self.path, body, self.app.tokenizer, self.app.template, self.app.max_len)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self.send_error_json(400, f"malformed JSON: {e}")
        except BadRequest as e:
            return self.send_error_json(400, str(e), param=e.param)
        try:
            self.app.waiting.put_nowait(job)
        except queue.Full:
            return self.send_error_json(503, f"the server is busy ({self.app.waiting.maxsize} requests waiting): "
                                             "retry later", 'server_error')
        chat = self.path == '/v1/chat/completions'
        try:
            (self.stream if stream else self.reply)(job, chat)
        except (BrokenPipeError, ConnectionResetError):  # the client is gone: free its row
            job.cancelled = True

    def events(self, job, text):
        """(new text, finish reason or None) as the engine thread reports tokens; ends on a stop string."""
        while True:
            kind, value = job.events.get()
            if kind == 'error':
                raise RuntimeError(value)
            new = text.add(value) if kind == 'tokens' else text.add([], final=True)
            if text.stopped:
                job.cancelled = True  # a stop string ended it: free the row
                yield new, 'stop'
                return
            yield new, value if kind == 'done' else None
            if kind == 'done':
                return

    def reply(self, job, chat):
        text = TextStream(self.app.tokenizer, job.stops)
        try:
            parts = list(self.events(job, text))
        except RuntimeError as e:
            return self.send_error_json(500, f"generation failed: {e}", 'server_error')
        content, finish = ''.join(p for p, _ in parts), parts[-1][1]
        n_out = len(job.request.tokens)
        choice = {'index': 0, 'finish_reason': finish}
        choice.update({'message': {'role': 'assistant', 'content': content}} if chat else
                      {'text': content, 'logprobs': None})
        self.send_json(200, {'id': ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex, 'created': int(time.time()),
                             'object': 'chat.completion' if chat else 'text_completion', 'model': self.app.name,
                             'choices': [choice],
                             'usage': {'prompt_tokens': len(job.request.prompt), 'completion_tokens': n_out,
                                       'total_tokens': len(job.request.prompt) + n_out}})

    def stream(self, job, chat):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.end_headers()
        head = {'id': ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex, 'created': int(time.time()),
                'object': 'chat.completion.chunk' if chat else 'text_completion', 'model': self.app.name}
        text, first = TextStream(self.app.tokenizer, job.stops), True
        try:
            for new, finish in self.events(job, text):
                if not new and finish is None:
                    continue
                if chat:
                    delta = {'role': 'assistant', 'content': new} if first else {'content': new}
                    choice = {'index': 0, 'delta': delta if new or first else {}, 'finish_reason': finish}
                else:
                    choice = {'index': 0, 'text': new, 'logprobs': None, 'finish_reason': finish}
                first = False
                self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
        except RuntimeError as e:  # headers are sent: the error goes in the stream, as OpenAI's does
            self.wfile.write(f"data: {json.dumps({'error': {'message': f'generation failed: {e}'}})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@dataclass
class App:
    """What the handlers share: the tokenizer and chat template, the queue, the engine (read only)."""
    name: str
    tokenizer: object
    template: object
    waiting: queue.Queue
    engine: Engine
    max_len: int
    started: int
    verbose: bool = False

    def busy(self):
        return sum(r is not None for r in self.engine.requests)


def main():
    torch.manual_seed(seed)
    try:
        dev = pick_device(device)
        model, tokenizer = load_for_inference(init_from, pick_dtype(dtype, dev), dev)
    except (ValueError, CheckpointError, DataError) as e:
        die(str(e))
    folder = init_from if os.path.isdir(init_from) else os.path.dirname(os.path.abspath(init_from))
    engine = Engine(model, max_batch, max_len, compile)
    if compile:
        print(f"compiling the decode step for up to {max_batch} rows ...", flush=True)
        engine.warm_up()
    app = App(os.path.basename(os.path.normpath(init_from)), tokenizer, chat_template(folder),
              queue.Queue(maxsize=queue_size), engine, max_len, int(time.time()))
    Handler.app = app
    server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
    server.request_queue_size = 1024  # connections the OS holds before accept: a burst of clients is not reset
    try:
        server.server_bind()
        server.server_activate()
    except OSError as e:
        die(f"cannot listen on {host}:{port}: {e.strerror or e}")
    server.daemon_threads = True
    threading.Thread(target=engine_loop, args=(engine, app.waiting), daemon=True).start()
    print(f"serving {app.name} on http://{host}:{server.server_address[1]} (max_batch={max_batch}, "
          f"max_len={max_len}, compile={compile}, device={dev})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    server.server_close()


if __name__ == '__main__':
    main()
