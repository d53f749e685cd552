"""
Tests for the SFT data set (data/sft/prepare.py): the loss masks cover the assistant's tokens only,
the reasoning switch is on for half the examples, the format is data/chat.py's, budgeted examples
state their budget and think within it, and a fine-tune from a missing checkpoint says what to run first.

Run: python -m pytest -q tests/test_sft.py
"""

import json
import os
import re

import numpy as np
import pytest

from data.chat import budget_line, chat_prompt
from data.envs import ENVS, TASK_BYTES, demonstration, make, tasks
from data.sft.prepare import FILL, render, within
from helpers import run_script
from model import config_file
from rollout import opening
from test_rl import REPO, chat_ckpt  # noqa: F401 (a fixture: a tiny chat model checkpoint)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    p = run_script("data/sft/prepare.py", "--n_train=6", "--n_val=2", "--envs=math,tools,instruct", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr
    return out


def stream(folder, split):
    ids = np.fromfile(folder / f"{split}.bin", dtype=np.uint32)
    mask = np.fromfile(folder / f"{split}.mask", dtype=np.uint8)
    return bytes(ids.tolist()).decode(), mask.tolist()


def test_masks_cover_the_assistant_turns_only(sft):
    text, mask = stream(sft, "train")
    assert json.loads((sft / "meta.json").read_text())["eot"] == 0 and text[0] == "\0" and mask[0] == 0
    examples = text[1:].split("\0")[:-1]  # every example ends with the end-of-text byte
    assert len(examples) == 18
    pos = 1
    for i, ex in enumerate(examples):
        env, think = ("math", "tools", "instruct")[i % 3], (i // 3) % 2 == 0
        task = make(env, i // 3)
        turns = demonstration(task, think)
        read = chat_prompt(task.prompt, "on" if think else "off")
        assert ex.startswith(read)
        said = ex[len(read):] + "\0"
        # what the mask marks, span by span: the assistant's turns, the tool turns left out
        marked = "".join(c for c, m in zip(text[pos:pos + len(ex) + 1], mask[pos:pos + len(ex) + 1]) if m)
        assert set(mask[pos:pos + len(read)]) == {0}
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        answers[0] = answers[0].split("\n", 1)[1] if think else answers[0][len("<think></think>\n"):]
        assert marked == "\n".join(answers) + "\0" or marked == "".join(a + "\n" for a in answers)[:-1] + "\0"
        for t in turns:
            if t["role"] == "tool":
                assert f"<|tool|>\n{t['content']}\n<|assistant|>\n" in said
        assert not re.search(r"<\|(user|system|tool)\|>", marked)
        pos += len(ex) + 1


def test_every_conversation_fits_the_context_it_is_trained_and_played_in():
    """A demonstration longer than config/sft.py's block_size is cut into windows that never hold a whole
    conversation, and its episode runs out of context before it can answer: every environment's, with
    thinking on and off, must fit, with its prompt, trace and answer within data/envs.py's TASK_BYTES.
    Ruler is left out: its haystacks are long contexts by design, not an SFT environment."""
    block_size = config_file(os.path.join(REPO, "config", "sft.py"))[1]["block_size"]
    for env in [e for e in ENVS if e != "ruler"]:
        for task in tasks(env, 8 if env == "code" else 60):
            assert len(task.prompt) + len(task.trace) + len(task.answer) <= TASK_BYTES, task
            for think in (True, False):
                n = sum(len(text.encode()) for text, _ in render(task, think))
                assert n <= block_size, (env, task.seed, think, n)


def test_half_the_examples_think(sft):
    text, _ = stream(sft, "val")
    examples = text[1:].split("\0")[:-1]
    assert len(examples) == 6 and sum("/think\n" in ex for ex in examples) == 3
    assert sum("<think></think>" in ex for ex in examples) == 3


def test_a_budgeted_trace_keeps_whole_lines_within_its_share_of_the_budget():
    trace = "  865\n+ 395\nunits: 5 + 5 = 10, write 0, carry 1\ntens: 6 + 9 + carry 1 = 16, write 6, carry 1"
    assert FILL == 0.75
    assert within(trace, 32, len) == "  865\n+ 395"             # 12 tokens with the newline, 24 allowed
    assert within(trace, 64, len) == "\n".join(trace.split("\n")[:3])  # 48 of 48: the limit is inclusive
    assert within(trace, 63, len) == "  865\n+ 395"
    assert within(trace, 1000, len) == trace
    assert within("a line longer than the budget allows", 8, len) == ""


def test_budgeted_examples_state_the_budget_and_think_within_it(tmp_path):
    p = run_script("data/sft/prepare.py", "--n_train=12", "--n_val=2", "--envs=add,instruct", "--budget_frac=0.5",
                   "--budgets=32,96", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    text, mask = stream(tmp_path, "train")
    assert json.loads((tmp_path / "meta.json").read_text())["budgets"] == [32, 96]
    examples = text[1:].split("\0")[:-1]
    budgeted = {}
    for i, ex in enumerate(examples):
        env, think = ("add", "instruct")[i % 2], (i // 2) % 2 == 0
        task = make(env, i // 2)
        stated = re.search(r"Think for at most (\d+) tokens\.", ex)
        assert think or not stated  # budgets only with thinking on
        if not stated:
            continue
        B = int(stated.group(1))
        budgeted[B] = budgeted.get(B, 0) + 1
        assert ex.startswith(opening(task, "on", B)) and budget_line(B) in ex  # rl.py's and eval.py's prompt, as is
        thinking = ex[len(opening(task, "on", B)):].split("</think>")[0]
        assert len(thinking) <= FILL * B and task.trace.startswith(thinking.rstrip("\n"))
        assert ex.endswith("</think>\n" + task.answer)  # the full answer after the shortened thinking
    assert set(budgeted) == {32, 96} and 2 <= sum(budgeted.values()) <= 10  # about half of the 12 thinking-on


def test_bad_flags(tmp_path):
    p = run_script("data/sft/prepare.py", "--envs=math,chess", f"--out_dir={tmp_path}")
    assert p.returncode == 1 and "chess" in p.stderr and "math" in p.stderr and "Traceback" not in p.stderr
    for flag in ("--budgets=32,x", "--budgets=0", "--budget_frac=1.5"):
        p = run_script("data/sft/prepare.py", flag, f"--out_dir={tmp_path}")
        assert p.returncode == 1 and flag.split("=")[0] in p.stderr and "Traceback" not in p.stderr


def test_fine_tuning_without_a_pretrained_model_says_what_to_run(sft, tmp_path):
    p = run_script("train.py", "config/sft.py", f"--dataset={sft}", f"--init_from={tmp_path / 'out'}",
                   f"--out_dir={tmp_path / 'sft'}")
    assert p.returncode != 0 and "python train.py" in p.stderr and "Traceback" not in p.stderr


def test_the_budget_stage_fine_tunes_an_sft_model_on_a_budget_set(chat_ckpt, tmp_path):
    data, sft_dir = tmp_path / "sft_budget", chat_ckpt  # test_rl's tiny chat model stands in for out-sft/
    p = run_script("data/sft/prepare.py", "--n_train=8", "--n_val=2", "--envs=add,instruct", "--budget_frac=0.5",
                   f"--out_dir={data}")
    assert p.returncode == 0, p.stderr
    p = run_script("train.py", "config/sft_budget.py", f"--dataset={data}", f"--init_from={sft_dir}",
                   f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2",
                   "--eval_iters=1", "--batch_size=2", "--block_size=256", "--device=cpu", "--compile=False")
    assert p.returncode == 0, p.stderr
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log[0]["config"]["learning_rate"] == 3e-4 and log[0]["config"]["init_from"] == str(sft_dir)
    assert (tmp_path / "out" / "ckpt.pt").exists()
