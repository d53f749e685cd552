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

Loss masks (train.mask, val.mask): 1 on the assistant's tokens (its turns and the "\\0" that ends
the conversation), 0 on the system, user and tool turns, which are only read. Train and val draw
different training seeds; the held-out seeds (data/envs.py HELDOUT up) are left for evaluation.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.chat import chat_prompt  # noqa: E402  (the repo root first)
from data.envs import ENVS, demonstration, tasks  # noqa: E402
from data.tokenizer import ByteTokenizer, write_dataset  # noqa: E402

EOT = "\0"


def render(task, think):
    """One conversation as (text, is_target) pieces: what the model reads, and what it learns to say."""
    reasoning = "on" if think else "off"
    turns = demonstration(task, think)  # assistant (and tool) turns
    opening = chat_prompt(task.prompt, reasoning)  # system, user, and the assistant's <think> opening
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


def build(envs, n, start, tok):
    """Tokens and loss mask of n examples per environment (seeds start..), thinking on for every
    other one, interleaved across environments."""
    ids, mask = tok.encode(EOT), [0]  # the stream starts a document; every example ends with the next one's start
    per_env = [tasks(env, n, "train", start) for env in envs]
    for i in range(n):
        for env_tasks in per_env:
            for text, target in render(env_tasks[i], think=i % 2 == 0):
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
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    envs = args.envs.split(",")
    unknown = [e for e in envs if e not in ENVS]
    if unknown or args.n_train < 1 or args.n_val < 1:
        sys.exit(f"error: unknown environment {unknown[0]!r}, choose from {','.join(ENVS)}" if unknown else
                 "error: --n_train and --n_val must be >= 1")
    tok = ByteTokenizer()
    train, train_mask = build(envs, args.n_train, 0, tok)
    val, val_mask = build(envs, args.n_val, args.n_train, tok)
    meta = write_dataset(args.out_dir, train, val, {**tok.meta, "eot": 0, "envs": envs},
                         masks=(train_mask, val_mask))
    share = sum(train_mask) / len(train_mask)
    print(f"{os.path.basename(args.out_dir)}: {len(envs)} environments, train {meta['train_tokens']:,} tokens "
          f"({share:.0%} assistant), val {meta['val_tokens']:,} tokens -> {args.out_dir}")


if __name__ == "__main__":
    main()
