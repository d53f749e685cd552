"""
data/sft/prepare.py: the supervised fine-tuning set, chat turns built from data/envs.py's
demonstrations. Read data/envs.py and data/chat.py first.
Run: python data/sft/prepare.py                          (2-3 minutes: each code task runs in the sandbox)
     python data/sft/prepare.py --n_train=400 --envs=math,tools --out_dir=data/sft_small

Each example is one conversation in data/chat.py's plain format: a system turn with the reasoning
switch (/think on half of the examples, /no_think on the other half, Llama-Nemotron's mix), the
user's prompt, then the environment's demonstration: the assistant's <think> trace and answer (an
empty <think></think> with thinking off), and for tool use its tool calls with the tool's turns
between them. Byte tokens, as the pretrained default model's; every example is a document of its
own that starts with the end-of-text byte "\\0" (meta "eot": train with --doc_masking=True), and
the model learns to end its answer with that byte.

Budget control (Nemotron Nano 2, Nemotron 3): with --budget_frac > 0, that share of the thinking-on
examples states a budget in the system turn ("Think for at most B tokens.", B drawn from --budgets)
and shows a trace that keeps it: the trace's whole lines that fit in FILL * B tokens (the newline
before </think> counted, as rollout.py counts thinking), then </think> and the full answer. The model
sees short thinking under a small B, which sampling from a model that always thinks long never gives
GRPO to reinforce.

Loss masks (train.mask, val.mask): 1 on the assistant's tokens (its turns and the "\\0" that ends
the conversation), 0 on the system, user and tool turns, which are only read. Train and val draw
different training seeds; the held-out seeds (data/envs.py HELDOUT up) are left for evaluation.
"""
import argparse
import dataclasses
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.chat import BUDGETS, budget_line, chat_prompt  # noqa: E402  (the repo root first)
from data.envs import ENVS, demonstration, tasks  # noqa: E402
from data.tokenizer import ByteTokenizer, write_dataset  # noqa: E402

EOT = "\0"
FILL = 0.75  # a budgeted trace takes at most this share of B: room for the model's own variation


def within(trace, budget, count):
    """The longest run of the trace's first lines whose thinking (the lines and the newline before
    </think>) counts at most FILL * budget tokens; '' when not even the first line fits."""
    lines, kept = trace.split("\n"), ""
    for i in range(1, len(lines) + 1):
        text = "\n".join(lines[:i])
        if count(text + "\n") > FILL * budget:
            break
        kept = text
    return kept


def render(task, think, budget=None, count=len):
    """One conversation as (text, is_target) pieces: what the model reads, and what it learns to say.
    budget: thinking tokens the system turn states (thinking on only); count: a text's tokens."""
    reasoning = "on" if think else "off"
    messages = [{"role": "user", "content": task.prompt}]
    if budget:
        assert think, "a budget is stated with thinking on only"
        task = dataclasses.replace(task, trace=within(task.trace, budget, count))
        messages.insert(0, {"role": "system", "content": budget_line(budget)})
    turns = demonstration(task, think)  # assistant (and tool) turns
    opening = chat_prompt(messages, reasoning)  # system, user, and the assistant's <think> opening
    first = turns[0]["content"]
    start = "<think>\n" if think else "<think></think>\n"  # chat_prompt already opened the thinking section
    assert first.startswith(start), first[:40]
    pieces = [(opening, False), (first[len(start):] + "\n", True)]
    for turn in turns[1:]:
        if turn["role"] == "tool":
            pieces.append((f"<|tool|>\n{turn['content']}\n<|assistant|>\n", False))
        else:
            pieces.append((turn["content"] + "\n", True))
    text, target = pieces[-1]
    pieces[-1] = (text[:-1] + EOT, target)  # the last answer ends with the end-of-text byte, not a newline
    return pieces


def build(envs, n, start, tok, budget_frac=0.0, budgets=BUDGETS):
    """Tokens and loss mask of n examples per environment (seeds start..), thinking on for every
    other one, interleaved across environments; budget_frac of the thinking-on ones state a budget."""
    ids, mask = tok.encode(EOT), [0]  # the stream starts a document; every example ends with the next one's start
    per_env = [tasks(env, n, "train", start) for env in envs]
    rng = random.Random(start)  # which examples state which budget: a function of the seeds
    count = lambda text: len(tok.encode(text))
    for i in range(n):
        for env_tasks in per_env:
            think = i % 2 == 0
            budget = rng.choice(budgets) if think and rng.random() < budget_frac else None
            for text, target in render(env_tasks[i], think, budget, count):
                assert EOT not in text[:-1], "a task's text holds the end-of-text byte"
                piece = tok.encode(text)
                ids += piece
                mask += [int(target)] * len(piece)
    return ids, mask


def main():
    ap = argparse.ArgumentParser(description="the SFT data set from data/envs.py's demonstrations")
    ap.add_argument("--envs", default="math,code,instruct,tools", help=f"comma-separated, of {','.join(ENVS)}")
    ap.add_argument("--n_train", type=int, default=2000, help="examples per environment in train")
    ap.add_argument("--n_val", type=int, default=100, help="examples per environment in val")
    ap.add_argument("--budget_frac", type=float, default=0.0,
                    help="share of the thinking-on examples that state a thinking budget (0 to 1)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="the budgets they state, in tokens")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    envs = args.envs.split(",")
    unknown = [e for e in envs if e not in ENVS]
    if unknown or args.n_train < 1 or args.n_val < 1:
        sys.exit(f"error: unknown environment {unknown[0]!r}, choose from {','.join(ENVS)}" if unknown else
                 "error: --n_train and --n_val must be >= 1")
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        budgets = [0]
    if min(budgets) < 1:
        sys.exit(f"error: --budgets={args.budgets!r} must be comma-separated token counts >= 1")
    if not 0 <= args.budget_frac <= 1:
        sys.exit(f"error: --budget_frac={args.budget_frac} must be between 0 and 1")
    tok = ByteTokenizer()
    train, train_mask = build(envs, args.n_train, 0, tok, args.budget_frac, budgets)
    val, val_mask = build(envs, args.n_val, args.n_train, tok, args.budget_frac, budgets)
    meta = write_dataset(args.out_dir, train, val, {**tok.meta, "eot": 0, "envs": envs, "budget_frac": args.budget_frac,
                                                    "budgets": budgets}, masks=(train_mask, val_mask))
    share = sum(train_mask) / len(train_mask)
    print(f"{os.path.basename(args.out_dir)}: {len(envs)} environments, train {meta['train_tokens']:,} tokens "
          f"({share:.0%} assistant), val {meta['val_tokens']:,} tokens -> {args.out_dir}")


if __name__ == "__main__":
    main()
