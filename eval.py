"""
eval.py: evaluation of a checkpoint: long context, and the post-trained chat model. Read after sample.py,
data/ruler.py and rollout.py.

    python eval.py --init_from=out-swan --lengths=256,1024,4096,8192               # val loss per length
    python eval.py --init_from=out-swan --swan=off                                 # without SWAN scaling
    python eval.py --init_from=out-star-niah --tasks=niah_single_1 --lengths=2048,4096 --star_blocks=0,512

1. Val loss at each context length: the mean next-token cross-entropy over whole sequences of that
   length from the run's val split (the same sequences for every model on the same data set), about
   loss_tokens tokens per length.
2. RULER scores (data/ruler.py) per task, length and Star Attention block size (0: full attention):
   n prompts per cell, greedy decoding, the prediction cut at its first newline (our models end an
   answer with one, as RULER's end theirs with EOS), scored by string-match recall (0-100); and
   how often Star Attention's prediction is exactly full attention's (when block 0 is evaluated too).
   A run trained with doc_masking gets each prompt started with its data set's end-of-text token
   (--bos), and NIAH prompts end with the answer prefix its data set was built with (--answer_prefix).
Printed as tables; --json_out=PATH also writes every figure as JSON.
3. --tasks=chat: the chat model on data/envs.py's held-out tasks (rollout.evaluate: greedy, n per
   environment, tool turns included): accuracy with reasoning on and off, mean thinking tokens, and
   with --reasoning_budget=B (stated in the system turn, reasoning on) the share of answers whose
   thinking stayed within B: enforced by default (the thinking closed after B tokens, as sample.py's
   budget), or left to the model with --force_budget=False. --best_of=k also samples k episodes a task
   (temperature 1, reasoning on, as GRPO's groups are) and scores each task by the best of them
   (pass@k for a 0/1 reward): how often RL's group holds an answer worth reinforcing. --json=True
   prints one JSON object only.
    python eval.py --tasks=chat --init_from=out-rl --n=24 --json=True
    python eval.py --tasks=chat --init_from=out-rl --reasoning_budget=64
"""
import contextlib
import json as json_lib
import os
import sys
import time

import numpy as np
import torch

from attention import Attention
from data import ruler
from data.envs import MAX_TURNS
from data.tokenizer import DataError, open_tokens, read_meta, saved_config
from checkpoint import CheckpointError, load_for_inference
from hardware import pick_device

# -----------------------------------------------------------------------------
init_from = 'out'                  # a train.py out_dir, a ckpt.pt, or a Hugging Face NemotronH folder
lengths = '256,1024,4096,8192'     # context lengths in tokens, comma-separated
dataset = ''                       # val data for the loss: data/<dataset> ('': the run's own; 'none': skip the loss)
loss_tokens = 32768                # tokens of val data per length for the loss
tasks = ''                         # RULER tasks, comma-separated ('': none; 'all': every task)
n = 10                             # prompts per task and length
star_blocks = '0'                  # Star Attention block sizes, comma-separated (0: full attention)
essay = ''                         # a text file for the essay haystacks ('': ../shared/data/tinyshakespeare.txt)
swan = 'ckpt'                      # NoPE dynamic scaling: 'ckpt' as trained, 'off', or a training length N
seed = 0                           # RULER sample seed
answer_prefix = 'auto'             # NIAH answer prefix: 'ruler' (RULER's), 'needle' (the needle's words;
                                   # data/ruler.py), or 'auto' = the one the run's data set was built with
                                   # (meta.json), else 'ruler'
bos = 'auto'                       # start each RULER prompt with the data set's end-of-text token: 'on', 'off', or
                                   # 'auto' = on for a run trained with doc_masking (its documents start with one)
device = 'auto'                    # 'auto' (cuda, else cpu), 'cpu', 'cuda', ...
json_out = ''                      # also write the results here as JSON ('': don't)
# --tasks=chat
envs = 'math,code,instruct,tools'  # data/envs.py environments, comma-separated
reasoning_budget = 0               # thinking tokens stated in the system turn (0: none)
force_budget = True                # and enforced: "</think>" put in after B tokens (False: the model's own length)
max_new_tokens = 256               # tokens per assistant turn
max_turns = MAX_TURNS              # assistant turns per episode (tool calls between them)
max_len = 0                        # tokens of a whole episode (0: the block_size the checkpoint trained at, else 512)
best_of = 0                        # k > 0: also k episodes a task at temperature 1, reasoning on: the best reward
json = False                       # print one JSON object and nothing else
config_ranges = dict(loss_tokens='[1, inf)', n='[1, inf)', seed='[0, inf)', reasoning_budget='[0, inf)',
                     max_new_tokens='[1, inf)', max_turns='[1, inf)', max_len='[0, inf)',
                     best_of='[0, inf)')  # checked by configurator.py
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
with contextlib.redirect_stdout(sys.stderr):  # its "Overriding: ..." echo must not mix with --json's object
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))


def int_list(name, text, low):
    try:
        values = [int(v) for v in str(text).split(',') if v.strip()]
    except ValueError:
        die(f"--{name}={text!r}: expected comma-separated integers")
    if not values or min(values) < low:
        die(f"--{name}={text!r}: expected integers >= {low}")
    return values


def set_swan(model, train_len):
    """Dynamic attention scaling of every NoPE attention layer: on beyond train_len, or off (None)."""
    model.config.swan_train_len = train_len
    for m in model.modules():
        if isinstance(m, Attention) and m.rope_theta is None:
            m.swan_len = train_len


@torch.no_grad()
def val_loss(model, data, T, n_tokens, device):
    """Mean next-token loss over about n_tokens tokens of data (uint32 memmap) in sequences of T
    tokens, evenly spaced through the split, each forward at most ~16K tokens."""
    n_seq = max(1, n_tokens // T)
    if len(data) < T + 1:
        return None
    starts = np.linspace(0, len(data) - T - 1, n_seq).astype(np.int64)
    per_batch = max(1, 16384 // T)
    total = 0.0
    for i in range(0, n_seq, per_batch):
        rows = [torch.from_numpy(data[s:s + T + 1].astype(np.int64)) for s in starts[i:i + per_batch]]
        xy = torch.stack(rows).to(device)  # (b, T + 1)
        _, loss = model(xy[:, :-1], xy[:, 1:])
        total += loss.item() * len(rows)
    return total / n_seq


@torch.no_grad()
def ruler_score(model, tokenizer, task, T, block, device, start=(), prefix='ruler'):
    """RULER score (0-100) of `task` at length T, full attention (block 0) or Star Attention.
    start: token ids put before each prompt (an end-of-text token for a doc-masked run); prefix: the
    NIAH answer prefix (data/ruler.py PREFIX)."""
    samples = ruler.generate(task, T, tokenizer, n=n, seed=seed, essay=essay or None, prefix=prefix)
    predictions = []
    for s in samples:
        idx = torch.tensor([list(start) + tokenizer.encode(s['input'])], device=device)
        budget = len(tokenizer.encode(s['answer'])) + 8  # the answer's length and a margin
        # Star Attention: the context goes through phase 1 in blocks; the query (question and answer
        # prefix) is phase 2's, attending to every block
        query_len = idx.size(1) - len(tokenizer.encode(s['input'][:-len(s['query'])]))
        kwargs = {'star_block': block, 'star_query': query_len} if block else {}
        out = model.generate(idx, budget, temperature=0, **kwargs)
        predictions.append(tokenizer.decode(out[0, idx.size(1):].tolist()).split('\n')[0])
    return ruler.score(predictions, [s['outputs'] for s in samples]), predictions


def run_meta(path):
    """The saved train.py flags of the run at path, its data set's name (--dataset, else the run's;
    None if neither names one) and that data set's meta.json ({} if none)."""
    cfg = saved_config(path)
    name = dataset if dataset not in ('', 'none') else cfg.get('dataset')
    try:
        return cfg, name, read_meta(os.path.join(REPO, 'data', name)) if name else {}
    except DataError:
        return cfg, name, {}


def bos_tokens(path, cfg, meta):
    """(eot,) when RULER prompts should start with the data set's end-of-text token (--bos), else ().
    cfg, meta: run_meta(path). A run trained with doc_masking saw every document start with it, as
    prompts of Hugging Face models start with their BOS token; it may have learnt to lean on it."""
    if bos not in ('auto', 'on', 'off'):
        die(f"--bos={bos!r}: expected 'auto', 'on' or 'off'")
    if bos == 'off' or (bos == 'auto' and not cfg.get('doc_masking')):
        return ()
    eot = meta.get('eot')
    if eot is None:
        die(f"--bos={bos}: no end-of-text token known for {path} (its data set's meta.json names none)")
    return (eot,)


def fmt(x, digits=4):
    return 'n/a' if x is None else f"{x:.{digits}f}"


def table(title, rows, cols, cell, name=str):
    print(f"\n{title}")
    print(" | ".join([f"{'':>26}"] + [f"{c:>8}" for c in cols]))
    for r in rows:
        print(" | ".join([f"{name(r):>26}"] + [f"{cell(r, c):>8}" for c in cols]))


def chat():
    """3: the chat scores, as one JSON object (--json) or a table."""
    from data.envs import env_names
    from rollout import evaluate, mean
    try:
        env_list = env_names(envs)
        model, tokenizer = load_for_inference(init_from, torch.float32, eval_device())
    except (ValueError, CheckpointError, DataError) as e:
        die(str(e), 2)
    if tokenizer.eot is None:
        die(f"{init_from}: its tokenizer has no end-of-text token: not a chat model (fine-tune it on data/sft)", 2)
    length = max_len or saved_config(init_from).get('block_size') or 512
    t0 = time.time()
    budget = {'on': reasoning_budget or None, 'off': None}  # (0: none)
    on, off = (evaluate(model, tokenizer, env_list, n, tokenizer.eot, r, budget[r], max_new_tokens, max_turns, length,
                        force_budget=force_budget, samples=best_of * (r == 'on')) for r in ('on', 'off'))
    scores = {env: {'accuracy_on': on[env]['accuracy'], 'accuracy_off': off[env]['accuracy'],
                    'thinking_on': on[env]['thinking'], 'skipped': on[env]['skipped'],
                    **({'within_budget': on[env]['within_budget']} if reasoning_budget else {}),
                    **({'best_of_k': on[env]['best_of_k']} if best_of else {})} for env in env_list}
    result = {'init_from': init_from, 'n': n, 'reasoning_budget': reasoning_budget or None, 'max_len': length,
              'best_of': best_of or None,
              'force_budget': force_budget if reasoning_budget else None,
              'envs': scores, 'mean_on': mean(s['accuracy_on'] for s in scores.values()),
              'mean_off': mean(s['accuracy_off'] for s in scores.values()),
              'mean_best_of': mean(s['best_of_k'] for s in scores.values()) if best_of else None,
              'time_s': time.time() - t0}
    if json:
        print(json_lib.dumps(result))
    else:
        cols = ['accuracy_on', 'accuracy_off', 'thinking_on', 'skipped']
        cols += ['within_budget'] if reasoning_budget else []
        cols += ['best_of_k'] if best_of else []
        table(f"held-out chat scores, {n} tasks per environment, greedy" +
              (f", thinking budget {reasoning_budget}" if reasoning_budget else ""), env_list, cols,
              lambda env, c: fmt(scores[env][c], 3))
        print(f"mean accuracy: reasoning on {result['mean_on']:.3f}, off {result['mean_off']:.3f}" +
              (f"; best of {best_of} {result['mean_best_of']:.3f}" if best_of else ""))
    if json_out:
        with open(json_out, 'w') as f:
            json_lib.dump(result, f, indent=1)


def eval_device():
    """--device, 'auto' picking CUDA or the CPU (not mps); ValueError for a device that is not there."""
    return pick_device('cpu' if device == 'auto' and not torch.cuda.is_available() else device)


def main():
    if tasks == 'chat':
        return chat()
    T_list = int_list('lengths', lengths, 1)
    blocks = int_list('star_blocks', star_blocks, 0)
    task_list = ruler.TASKS if tasks == 'all' else [t for t in tasks.split(',') if t]
    unknown = [t for t in task_list if t not in ruler.TASKS]
    if unknown:
        die(f"unknown RULER task(s) {unknown}; choose from {', '.join(ruler.TASKS)} or 'all'")
    try:
        dev = eval_device()
    except ValueError as e:
        die(str(e))
    if json_out:  # before the work, not after it: an unwritable path would lose the results
        existed = os.path.exists(json_out)
        try:
            with open(json_out, 'a'):
                pass
        except OSError as e:
            die(f"--json_out={json_out}: cannot write there ({e.strerror or e})")
        if not existed:
            os.remove(json_out)
    try:
        model, tokenizer = load_for_inference(init_from, torch.float32, dev)
    except (CheckpointError, DataError) as e:
        die(str(e))
    if swan != 'ckpt':
        if swan != 'off' and not swan.isdigit():
            die(f"--swan={swan!r}: expected 'ckpt', 'off' or a training length such as 256")
        set_swan(model, None if swan == 'off' else int(swan))
    cfg, name, meta = run_meta(init_from)
    start = bos_tokens(init_from, cfg, meta)
    prefix = meta.get('answer_prefix', 'ruler') if answer_prefix == 'auto' else answer_prefix
    if prefix not in ruler.PREFIX:
        die(f"--answer_prefix={answer_prefix!r}: expected 'auto' or one of {', '.join(ruler.PREFIX)}")
    print(f"{init_from}: pattern {model.config.pattern}, swan_train_len {model.config.swan_train_len}"
          + (f", prompts start with token {start[0]}" if start else "") + f", answer prefix '{prefix}'")
    results = {'config': config, 'pattern': model.config.pattern,
               'swan_train_len': model.config.swan_train_len, 'loss': {}, 'ruler': {}, 'agreement': {}, 'time_s': {}}

    # 1. val loss per context length
    if dataset != 'none':
        if not name:
            die(f"{init_from} names no data set: pass --dataset=NAME (data/NAME/val.bin) or --dataset=none")
        try:  # val.bin checked as train.py checks it: size, count, ids inside the vocabulary
            data_meta = read_meta(os.path.join(REPO, 'data', name))
            data = open_tokens(os.path.join(REPO, 'data', name), 'val', data_meta)
        except DataError as e:
            die(f"{e} (run `python data/{name}/prepare.py` if the data set is not prepared)")
        if data_meta['vocab_size'] > model.config.vocab_size:
            die(f"data/{name} has a vocabulary of {data_meta['vocab_size']}, the model {model.config.vocab_size}")
        for T in T_list:
            t0 = time.time()
            results['loss'][T] = val_loss(model, data, T, loss_tokens, dev)
            results['time_s'][f'loss@{T}'] = time.time() - t0
        table(f"val loss on data/{name} ({loss_tokens:,} tokens per length)", ['loss'], T_list,
              lambda r, T: fmt(results['loss'][T]))

    # 2. RULER, per task x length x block size
    label = lambda b: 'full' if b == 0 else f'star{b}'
    for task in task_list:
        for block in blocks:
            for T in T_list:
                t0 = time.time()
                try:
                    s, preds = ruler_score(model, tokenizer, task, T, block, dev, start, prefix)
                except ruler.TooShort:  # the task's prompt needs more than T tokens: n/a
                    s, preds = None, []
                except DataError as e:
                    die(str(e))
                key = f"{task}|{label(block)}|{T}"
                results['ruler'][key] = {'score': s, 'predictions': preds}
                results['time_s'][key] = time.time() - t0
    if task_list:
        rows = [(t, b) for t in task_list for b in blocks]
        table(f"RULER string-match score (0-100), {n} prompts per cell", rows, T_list,
              lambda r, T: fmt(results['ruler'][f'{r[0]}|{label(r[1])}|{T}']['score'], 1),
              name=lambda r: f"{r[0]} {label(r[1])}")
    star = [b for b in blocks if b] if 0 in blocks else []
    for task in task_list:  # how often Star Attention's answer is exactly full attention's
        for b in star:
            for T in T_list:
                full, ours = (results['ruler'][f"{task}|{x}|{T}"]['predictions'] for x in ('full', label(b)))
                same = sum(p == q for p, q in zip(full, ours))
                results['agreement'][f"{task}|{label(b)}|{T}"] = 100.0 * same / len(full) if full else None
    if star:
        table("Star Attention's predictions equal to full attention's (% of prompts)",
              [(t, b) for t in task_list for b in star], T_list,
              lambda r, T: fmt(results['agreement'][f'{r[0]}|{label(r[1])}|{T}'], 1),
              name=lambda r: f"{r[0]} {label(r[1])}")
    if json_out:
        with open(json_out, 'w') as f:
            json_lib.dump(results, f, indent=1)
        print(f"\nwrote {json_out}")


if __name__ == '__main__':
    main()
