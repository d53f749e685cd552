"""
sample.py: load a model and stream a continuation of a prompt. Read after model.py and train.py.

    python sample.py --init_from=out --start="def fib(n):"
    python sample.py --init_from=path/to/hf_folder --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=out/ckpt.pt --num_samples=3 --top_k=50 --top_p=0.95
    python sample.py --init_from=out-mtp --speculative=2   # MTP drafts 2 tokens, one verification each

--init_from is a train.py out_dir, a ckpt.pt of ours, or a Hugging Face NemotronH folder
(Model.from_pretrained reads all three). The tokenizer comes from the run's data set
(data/<dataset>/meta.json, or a meta.json / tokenizer.json beside the checkpoint) or from the
HF folder's tokenizer.json. Decoding is cached: one prefill over the prompt, then one token at a
time (Mamba layers carry a constant-size state, attention layers a KV cache).
"""
import os
import sys
import time

import torch

from data.tokenizer import ByteTokenizer, DataError, load_tokenizer
from model import CheckpointError, Nemotron

# -----------------------------------------------------------------------------
init_from = 'out'         # a train.py out_dir, a ckpt.pt, or a Hugging Face NemotronH folder
start = '\n'              # the prompt, or "FILE:path" to read it from a file
num_samples = 1           # samples to draw, one after the other
max_new_tokens = 200      # tokens generated per sample
temperature = 0.8         # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
top_k = None              # keep only the k most likely tokens (None: all)
top_p = None              # keep the smallest set of tokens whose probability reaches p (None: all)
speculative = 0           # self-speculative decoding: the MTP depths draft this many tokens per step (0: off)
seed = 1337               # torch seed, so that sampling is reproducible
device = 'auto'           # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'            # 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', 'bfloat16', 'float16'
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))


def die(message):
    """Bad input: one line on stderr, exit 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def note(message):
    print(message, file=sys.stderr, flush=True)


def resolve_device(name):
    if name.startswith('cuda') and not torch.cuda.is_available():
        die(f"device={name!r} but torch sees no CUDA GPU (device='auto' picks what there is)")
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if torch.backends.mps.is_available() else 'cpu'


def resolve_dtype(name, device):
    if name == 'auto':  # bf16 halves memory and runs on tensor cores; fp32 is what CPUs do fastest
        cuda_bf16 = device.startswith('cuda') and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in ('float32', 'bfloat16', 'float16'):
        die(f"dtype={name!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    return getattr(torch, name)


def saved_dataset(path):
    """The dataset named in an out_dir's / ckpt.pt's saved train config, or None."""
    ckpt_path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    try:  # mmap: reads only the small config entries, not the weights (again)
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
        return (ckpt.get('config') or {}).get('dataset')
    except Exception:  # a checkpoint that from_pretrained read but mmap cannot (an old format)
        return None


def find_tokenizer(path, vocab_size):
    """The tokenizer for the model at path: a tokenizer.json or meta.json beside the checkpoint,
    then data/<dataset>/meta.json of the run's data set; bytes for a 256-token model with neither."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidates = [folder]
    is_hf = os.path.isfile(os.path.join(folder, 'config.json'))
    dataset = None if is_hf else saved_dataset(path)
    if dataset:
        candidates.append(os.path.join(REPO, 'data', dataset))
    for d in candidates:
        if os.path.isfile(os.path.join(d, 'tokenizer.json')) or os.path.isfile(os.path.join(d, 'meta.json')):
            return load_tokenizer(d)
    looked = ', '.join(os.path.join(d, 'tokenizer.json or meta.json') for d in candidates)
    if vocab_size == 256:
        note(f"no tokenizer found ({looked}): the model has 256 tokens, using UTF-8 bytes")
        return ByteTokenizer()
    die(f"no tokenizer found for a {vocab_size}-token model (looked for {looked})")


def read_prompt(text):
    if not text.startswith('FILE:'):
        return text
    try:
        with open(text[len('FILE:'):], encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the prompt file: {e}")


# -----------------------------------------------------------------------------
# streaming: decode the whole token list each time and print only what is new, so that a
# character split across byte tokens is printed once it is complete (a trailing U+FFFD, the
# replacement for an incomplete UTF-8 sequence, waits for the next token)


def stream_sample(model, tokenizer, ids, dev):
    x = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    known = lambda toks: [t for t in toks if t < tokenizer.vocab_size]  # a padded vocab's extra ids
    printed = tokenizer.decode(known(ids))
    print(printed, end='', flush=True)
    tokens, n, t0, t_first = list(ids), 0, time.time(), None
    stats = {}
    gen = model.speculative_stream(x, max_new_tokens, speculative, temperature, top_k, top_p, stats) \
        if speculative else model.generate_stream(x, max_new_tokens, temperature, top_k, top_p)
    for nxt in gen:
        tok = nxt.item()  # the .item() syncs, so the timings below are honest on a GPU too
        t_first = t_first or time.time()
        n += 1
        if tokenizer.eot is not None and tok == tokenizer.eot:
            break
        tokens.append(tok)
        text = tokenizer.decode(known(tokens)).rstrip('\ufffd')
        if text.startswith(printed) and len(text) > len(printed):
            print(text[len(printed):], end='', flush=True)
            printed = text
    text = tokenizer.decode(known(tokens))  # whatever was held back at the end
    print(text[len(printed):] if text.startswith(printed) else '', flush=True)
    dt, dt_decode = time.time() - t0, time.time() - (t_first or t0)
    rate = (n - 1) / dt_decode if n > 1 and dt_decode > 0 else float('nan')
    note(f"[{n} tokens in {dt:.2f} s: prefill of {len(ids)} tokens {(t_first or t0) - t0:.2f} s, "
         f"then {rate:.1f} tok/s]")
    if stats.get('rounds'):  # tokens per verification: the accepted drafts plus the verifier's own
        per_pos = ' '.join(f"{a / stats['rounds']:.2f}" for a in stats['accepted'])
        note(f"[speculative={speculative}: {1 + sum(stats['accepted']) / stats['rounds']:.2f} tokens per "
             f"verification over {stats['rounds']} rounds; acceptance by draft position {per_pos}]")


def main():
    torch.manual_seed(seed)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not os.path.exists(init_from):
        die(f"--init_from={init_from}: no such file or folder (a train.py out_dir, a ckpt.pt or an HF folder)")
    try:
        model = Nemotron.from_pretrained(init_from, dtype=dt, device=dev).eval()
        tokenizer = find_tokenizer(init_from, model.config.vocab_size)
    except (CheckpointError, DataError) as e:
        die(str(e))
    prompt = read_prompt(start)
    try:
        ids = tokenizer.encode(prompt)
    except DataError as e:
        die(f"cannot encode the prompt: {e}")
    if not ids:
        die("the prompt is empty: give --start some text (the default is a newline)")
    if speculative and not model.config.mtp_depth:
        die(f"--speculative={speculative}: the model has no MTP depths to draft with (train with --mtp_depth=N)")
    if speculative and not 1 <= speculative <= (7 if model.config.mtp_share else min(7, model.config.mtp_depth)):
        die(f"--speculative={speculative}: this model drafts 1 .. "
            f"{7 if model.config.mtp_share else min(7, model.config.mtp_depth)} tokens (one per MTP depth unless mtp_share)")
    if max(ids) >= model.config.vocab_size:
        die(f"the tokenizer produced id {max(ids)}, beyond the model's vocab_size {model.config.vocab_size}")
    for _ in range(num_samples):
        stream_sample(model, tokenizer, ids, dev)
        print('---------------', flush=True)


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
