"""
sample.py: load a model and stream a continuation of a prompt. Read after model.py and train.py.

    python sample.py --init_from=out --start="def fib(n):"
    python sample.py --init_from=path/to/hf_folder --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=out/ckpt.pt --num_samples=3 --top_k=50 --top_p=0.95
    python sample.py --init_from=out-mtp --speculative=2   # MTP drafts 2 tokens, one verification each
    python sample.py --init_from=out --compile=True         # static caches, the one-token step compiled
    python sample.py --init_from=hf_folder --reasoning=on --reasoning_budget=512 --start="Why?"
    python sample.py --init_from=out --start=FILE:long.txt --star_block=1024 --star_query=32
    torchrun --nproc_per_node=2 sample.py --init_from=out --start=FILE:long.txt --star_block=1024

--star_block=b prefills with Star Attention (generate.star_prefill): the prompt's last star_query
tokens are the query, the rest the context, encoded in blocks of b tokens. Under torchrun each rank
is a host holding its blocks (gloo on a CPU, NCCL on GPUs); rank 0 prints.

--init_from is a train.py out_dir, a ckpt.pt of ours, or a Hugging Face NemotronH folder
(Model.from_pretrained reads all three). The tokenizer comes from the run's data set
(data/<dataset>/meta.json, or a meta.json / tokenizer.json beside the checkpoint) or from the
HF folder's tokenizer.json. Decoding is cached: one prefill over the prompt, then one token at a
time (Mamba layers carry a constant-size state, attention layers a KV cache).
"""
import json
import os
import sys
import time

import torch

from data.chat import ChatError, ThinkingBudget, chat_prompt, chat_template
from data.tokenizer import DataError, TextStream
from checkpoint import CheckpointError, load_for_inference
from generate import engine_stream, generate_stream, speculative_stream
from hardware import pick_device, pick_dtype

# -----------------------------------------------------------------------------
init_from = 'out'         # a train.py out_dir, a ckpt.pt, or a Hugging Face NemotronH folder
start = '\n'              # the prompt, or "FILE:path" to read it from a file
num_samples = 1           # samples to draw, one after the other
max_new_tokens = 200      # tokens generated per sample
temperature = 0.8         # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
top_k = None              # keep only the k most likely tokens (None: all)
top_p = None              # keep the smallest set of tokens whose probability reaches p (None: all)
speculative = 0           # self-speculative decoding: the MTP depths draft this many tokens per step (0: off)
reasoning = None          # 'on' / 'off': wrap the prompt as a chat turn with thinking on or off (None: raw prompt)
reasoning_budget = None   # close the thinking section after this many tokens of it (None: no limit)
star_block = 0            # Star Attention: encode the prompt's context in blocks of this many tokens (0: off)
star_query = 1            # Star Attention: the prompt's last this many tokens are the query (attend to everything)
compile = False           # static caches and the one-token step compiled (torch.compile; CUDA graphs on a GPU)
seed = 1337               # torch seed, so that sampling is reproducible
device = 'auto'           # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'            # 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', 'bfloat16', 'float16'
# the valid range of each numeric flag, checked by configurator.py before any work
config_ranges = dict(num_samples='[1, inf)', max_new_tokens='[1, inf)', temperature='[0, inf)', top_k='int [1, inf)',
                     top_p='(0, 1]', speculative='[0, 7]', reasoning_budget='int [0, inf)', star_block='[0, inf)',
                     star_query='[1, inf)', seed='[0, inf)')
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

star_group = None  # the process group of Star Attention's hosts under torchrun


def note(message):
    print(message, file=sys.stderr, flush=True)


def read_prompt(text):
    if not text.startswith('FILE:'):
        return text
    try:
        with open(text[len('FILE:'):], encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the prompt file: {e}")


# -----------------------------------------------------------------------------
# streaming: data/tokenizer.py's TextStream decodes the whole token list each time and gives only
# what is new, so that a character split across byte tokens is printed once it is complete


def stream_sample(model, tokenizer, ids, dev):
    x = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    text = TextStream(tokenizer, prompt=ids)
    print(text.text, end='', flush=True)
    n, t0, t_first = 0, time.time(), None
    stats = {}
    steer = ThinkingBudget(tokenizer, ids, reasoning_budget) if reasoning_budget is not None else None
    if compile:
        gen = engine_stream(model, ids, max_new_tokens, temperature, top_k, top_p, compile=True)
    elif speculative:
        gen = speculative_stream(model, x, max_new_tokens, speculative, temperature, top_k, top_p, stats)
    else:
        gen = generate_stream(model, x, max_new_tokens, temperature, top_k, top_p, steer, star_block, star_query,
                              star_group)
    for nxt in gen:
        tok = nxt.item()  # the .item() syncs, so the timings below are honest on a GPU too
        t_first = t_first or time.time()
        n += 1
        if tokenizer.eot is not None and tok == tokenizer.eot:
            break
        print(text.add([tok]), end='', flush=True)
    print(text.add([], final=True), flush=True)  # whatever was held back at the end
    dt, dt_decode = time.time() - t0, time.time() - (t_first or t0)
    rate = (n - 1) / dt_decode if n > 1 and dt_decode > 0 else float('nan')
    note(f"[{n} tokens in {dt:.2f} s: prefill of {len(ids)} tokens {(t_first or t0) - t0:.2f} s, "
         f"then {rate:.1f} tok/s]")
    if stats.get('rounds'):  # tokens per verification: the accepted drafts plus the verifier's own
        per_pos = ' '.join(f"{a / stats['rounds']:.2f}" for a in stats['accepted'])
        note(f"[speculative={speculative}: {1 + sum(stats['accepted']) / stats['rounds']:.2f} tokens per "
             f"verification over {stats['rounds']} rounds; acceptance by draft position {per_pos}]")


def star_hosts(dev):
    """Under torchrun (WORLD_SIZE > 1): join the process group of Star Attention's hosts, silence
    ranks other than 0, and return (group, device); else (None, dev)."""
    if int(os.environ.get('WORLD_SIZE', '1')) == 1:
        return None, dev
    if not star_block:
        die("under torchrun the ranks are Star Attention's hosts: give --star_block")
    import torch.distributed as dist
    cuda = dev.startswith('cuda')
    dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda:
        dev = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(dev)
    if dist.get_rank() != 0:  # every rank decodes (the hosts exchange per token); rank 0 prints
        sys.stdout = sys.stderr = open(os.devnull, 'w')
    return dist.group.WORLD, dev


def main():
    global star_group
    torch.manual_seed(seed)
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
    except ValueError as e:
        die(str(e))
    if star_block and speculative:
        die("--star_block and --speculative do not combine: use one of them")
    if compile and (speculative or star_block or reasoning_budget is not None):
        die("--compile decodes over static caches: not with --speculative, --star_block or --reasoning_budget yet")
    star_group, dev = star_hosts(dev)
    try:
        model, tokenizer = load_for_inference(init_from, dt, dev)
    except (CheckpointError, DataError) as e:
        die(str(e))
    prompt = read_prompt(start)
    if reasoning not in (None, 'on', 'off'):
        die(f"--reasoning={reasoning!r}: expected 'on' or 'off' (or leave it unset for a raw prompt)")
    if reasoning_budget is not None and speculative:
        die("--reasoning_budget and --speculative do not combine yet: use one of them")
    if reasoning is not None:
        folder = init_from if os.path.isdir(init_from) else os.path.dirname(os.path.abspath(init_from))
        try:
            prompt = chat_prompt(prompt, reasoning, chat_template(folder))
        except ChatError as e:
            die(str(e))
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
            f"{7 if model.config.mtp_share else min(7, model.config.mtp_depth)} tokens "
            "(one per MTP depth unless mtp_share)")
    if star_block and star_query > len(ids):
        die(f"--star_query={star_query}: the prompt has only {len(ids)} tokens")
    if star_block:
        n = -(-(len(ids) - star_query) // star_block)
        note(f"[Star Attention: a context of {len(ids) - star_query} tokens in {n} block(s) of {star_block}, "
             f"a query of {star_query}, {1 if star_group is None else star_group.size()} host process(es)]")
    if max(ids) >= model.config.vocab_size:
        die(f"the tokenizer produced id {max(ids)}, beyond the model's vocab_size {model.config.vocab_size}")
    for _ in range(num_samples):
        stream_sample(model, tokenizer, ids, dev)
        print('---------------', flush=True)
    if star_group is not None:
        from parallel import shutdown
        shutdown(None)  # a barrier, every group destroyed, and the process ends before a gloo thread can abort it


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
