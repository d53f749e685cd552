"""
data/envs.py: the post-training environments, their verifiers, the calculator and the sandbox.
Every environment is checked the same way: seeded tasks are reproducible and the splits disjoint, the
reference demonstration (thinking on and off) earns reward 1 and a known wrong answer less, and no
input makes verify() raise. The sandbox is checked against what it promises to stop.

    python -m pytest -q -p no:cacheprovider tests/test_envs.py
"""
import json
import os
import re
import time

import pytest

from data import envs
from data.chat import chat_prompt
from data.envs import (ENVIRONMENTS, ENVS, HELDOUT, Task, demonstration, final_answer, grade_integer, make, run_python,
                       run_tool, tasks, tool_call, verify)

SEEDS = range(6)  # each code task costs one sandbox run (~40 ms)


@pytest.mark.parametrize("env", ENVS)
def test_make_is_deterministic_and_seeds_differ(env):
    assert make(env, 3) == make(env, 3)
    assert len({(t.prompt, t.answer) for t in [make(env, s) for s in SEEDS]}) == len(SEEDS)


@pytest.mark.parametrize("env", ENVS)
def test_train_and_heldout_seeds_never_overlap(env):
    train, held = tasks(env, 3), tasks(env, 3, split="heldout")
    assert [t.seed for t in train] == [0, 1, 2] and [t.seed for t in held] == [HELDOUT, HELDOUT + 1, HELDOUT + 2]
    assert tasks(env, 1, start=2)[0] == train[2] and make(env, HELDOUT + 1) == held[1]
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    with pytest.raises(ValueError, match="HELDOUT"):
        tasks(env, 2, start=HELDOUT - 1)  # train may not run into the held-out seeds
    with pytest.raises(ValueError, match="start"):
        tasks(env, 2, split="heldout", start=-1)  # nor held-out tasks reach back into train
    with pytest.raises(ValueError, match="split"):
        tasks(env, 1, split="val")


@pytest.mark.parametrize("env", ENVS)
def test_reference_demonstration_earns_full_reward(env):
    for task in tasks(env, len(SEEDS)):
        for think in (True, False):
            turns = demonstration(task, think)
            opening = f"<think>\n{task.trace}\n</think>\n" if think else "<think></think>\n"
            assert turns[0]["role"] == "assistant" and turns[0]["content"].startswith(opening)
            assert sum("<think>" in t["content"] for t in turns) == 1  # the first assistant turn only
            assert turns[-1]["role"] == "assistant" and final_answer(turns[-1]["content"]) == task.answer
            assert verify(task, turns[-1]["content"]) == 1.0, (task.prompt, turns)
        text = chat_prompt([{"role": "user", "content": task.prompt}] + turns[:-1], "off")  # renders every role
        assert text.count("<|tool|>\n") == sum(t["role"] == "tool" for t in turns)


def test_tool_demonstration_replays_through_run_tool():
    """The results stored in a tools demonstration were computed by construction; run_tool must agree."""
    for task in tasks("tools", 20):
        turns = demonstration(task, think=True)
        calls = [tool_call(t["content"]) for t in turns if t["role"] == "assistant"]
        assert all(calls[:-1]) and calls[-1] is None  # tool calls, then an answer without one
        results = [t["content"] for t in turns if t["role"] == "tool"]
        assert [run_tool(task, *c) for c in calls[:-1]] == results
        assert results[-1] == task.answer and calls[-2][0] == "calc"


@pytest.mark.parametrize("env", ENVS)
def test_wrong_answers_score_below_one(env):
    for task in tasks(env, 4):
        if ENVIRONMENTS[env][1] is grade_integer:  # math, add, add5, tools: an exact integer
            wrong = [str(int(task.answer) + 1), task.answer + "0", f"The answer is {task.answer}"]
        elif env == "code":
            wrong = [task.answer + "0", task.answer.upper() + "!", ""]
        elif env == "ruler":
            wrong = [str(int(task.answer) + 1) if task.answer.isdigit() else task.answer[::-1], "no idea"]
        else:
            wrong = ["{}" if task.meta["constraints"][0][0] == "json" else "",
                     "<think>" + task.answer + "</think> nothing"]  # the answer inside the thinking does not count
        for w in wrong:
            assert verify(task, w) == 0.0, (env, task.answer, w)


def test_exact_integers_accept_whitespace_a_period_and_thousands_commas():
    task = Task("math", 0, "", "12345", "", {})
    for ok in ("12345", " 12345. ", "12,345", "<think>1+1</think>\n12,345.", "+12345"):
        assert verify(task, ok) == 1.0, ok
    for bad in ("1,2345", "12345..", "12 345", "123,45", "12345 apples", "0x3039"):
        assert verify(task, bad) == 0.0, bad


def test_code_output_ignores_trailing_spaces_only():
    task = Task("code", 0, "", "1 2\nab", "", {})
    assert verify(task, "1 2  \nab\n") == 1.0 and verify(task, "1  2\nab") == 0.0 and verify(task, "1 2 ab") == 0.0


def test_instruct_gives_partial_credit():
    task = Task("instruct", 0, "", "", "", {"constraints": [["words", 4], ["case", "lower"], ["include", "owl"]]})
    assert verify(task, "the owl hoots softly") == 1.0
    assert verify(task, "The owl hoots softly") == pytest.approx(2 / 3)
    assert verify(task, "The bird hoots") == 0.0
    assert verify(task, "the owls hoot softly") == pytest.approx(2 / 3)  # a whole word: "owls" is not "owl"
    task = Task("instruct", 0, "", "", "", {"constraints": [["json", ["a", "b"]], ["sum", 10]]})
    assert verify(task, '{"a": 3, "b": 7}') == 1.0
    assert verify(task, '{"a": 3, "b": 8}') == 0.5
    assert verify(task, '{"a": 3, "c": 7}') == 0.5  # the sum is right, the keys are not
    assert verify(task, '{"a": true, "b": 9}') == 0.0  # bool is not an integer
    assert verify(task, '{"a": 3, "b": 7') == 0.0 and verify(task, "[3, 7]") == 0.0


def test_instruct_reference_meets_each_constraint():
    for task in tasks("instruct", 200):
        kinds = [k for k, _ in task.meta["constraints"]]
        assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)
        for kind, arg in task.meta["constraints"]:
            assert envs.satisfied(kind, arg, task.answer), (kind, arg, task.answer)
        if "json" in kinds:
            assert set(json.loads(task.answer)) == set(task.meta["constraints"][0][1])


@pytest.mark.parametrize("env", ENVS)
def test_verify_never_raises_on_garbage(env):
    task = make(env, 1)
    junk = ["", " ", "</think>", "<think>" * 1000, "9" * 100_000, "{" * 50_000, "[" * 100_000, '{"a": 1, "b":',
            "\x00\udcff", "NaN", "1e999", None, 12, b"42", ["42"], {"role": "assistant"}]
    for j in junk:
        assert 0.0 <= verify(task, j) <= 1.0
    broken = Task(env, 0, "", "", "", {})  # a task missing what its verifier needs
    assert verify(broken, "42") == 0.0 and verify(None, "42") == 0.0


def test_final_answer_is_after_the_last_think():
    assert final_answer("<think>\n7\n</think>\n 42 \n") == "42"
    assert final_answer("<think>a</think>b</think> c") == "c"
    assert final_answer("  just text ") == "just text" and final_answer(None) == ""


def test_math_column_addition_shows_each_carry():
    """2931 + 68915 + 99 by hand: the trace must carry exactly where a pencil would."""
    assert envs.add_columns([2931, 68915, 99]).splitlines() == [
        "   2931", "+ 68915", "+    99",
        "units: 1 + 5 + 9 = 15, write 5, carry 1",
        "tens: 3 + 1 + 9 + carry 1 = 14, write 4, carry 1",
        "hundreds: 9 + 9 + carry 1 = 19, write 9, carry 1",
        "thousands: 2 + 8 + carry 1 = 11, write 1, carry 1",
        "ten-thousands: 6 + carry 1 = 7, write 7",
        "The sum is 71945."]
    assert envs.add_columns([99, 99, 99, 99]).splitlines()[-2:] == ["hundreds: carry 3, write 3", "The sum is 396."]


def test_code_trace_walks_the_snippet():
    for task in tasks("code", 4):
        lines = task.meta["source"].splitlines()
        assert 3 <= len(lines) <= 8
        walked = [s for s in task.trace.splitlines() if s.startswith("line ")]
        assert walked[0].startswith("line 1: " + lines[0]) and "prints" in walked[-1]
        assert task.trace.endswith("Output:\n" + task.answer)


def test_ruler_task_hides_the_needle_in_a_modest_haystack():
    for task in tasks("ruler", 6):
        lo, hi = envs.RULER_LENGTH
        assert task.answer in task.prompt and len(task.prompt) <= hi and task.meta["task"] in envs.RULER_TASKS
        assert task.prompt.count(task.answer) == 1 and len(task.prompt) > lo // 2
        every_value = " ".join(re.findall(r" is: (\S+?)\.", task.prompt))  # all needles, distractors too
        assert verify(task, every_value) == (len(every_value) <= envs.RULER_MAX_ANSWER)  # listing all earns nothing


def test_calculator_evaluates_integers_and_refuses_the_rest():
    task = make("tools", 0)
    for expr, want in [("3*4+2*7", "26"), ("-7 // 2", "-4"), ("7 % 3", "1"), ("(1+2)*3", "9"), ("8/2", "4"),
                       ("7/2", "3.5"), (" 79 - 43 ", "36")]:
        assert run_tool(task, "calc", expr) == want, expr
    for expr in ["__import__('os')", "(1).real", "x + 1", "9**9**9", "2**3", "'a' * 3", "1.5 * 2", "True + 1",
                 "[1][0]", "1 if 1 else 2", "1/0", "", "(" * 150, " * ".join(["99999999999999999999"] * 8),
                 "9" * 199, "lambda: 0", "a.b.c"]:
        assert run_tool(task, "calc", expr).startswith("error: "), expr


def test_tools_protocol():
    task = make("tools", 1)
    key = next(iter(task.meta["store"]))
    assert run_tool(task, "lookup", key.upper()) == str(task.meta["store"][key])
    assert run_tool(task, "lookup", "unicorn") == "error: no such key"
    assert run_tool(task, "shell", "ls").startswith("error: unknown tool")
    assert run_tool(task, "lookup", None) == "error: no such key" and run_tool(task, "calc", None).startswith("error")
    assert tool_call("ok <tool> lookup :  pear </tool>") == ("lookup", "pear")
    assert tool_call("<tool>calc: (1+2)*3</tool><tool>lookup: fig</tool>") == ("calc", "(1+2)*3")
    assert tool_call("the answer is 26") is None and tool_call(None) is None and tool_call("<tool>calc</tool>") is None


def test_unknown_env_lists_the_valid_names():
    with pytest.raises(ValueError, match="math, code, instruct, tools, ruler"):
        make("chess", 0)
    with pytest.raises(ValueError, match="seed"):
        make("math", -1)  # random.Random(-1) is random.Random(1): no negative seeds


# ----------------------------------------------------------------------------
# the sandbox

def test_sandbox_runs_code_and_reports_the_error_line():
    assert run_python("print(1 + 2)\nprint('ok')") == (True, "3\nok\n")
    assert run_python("1 / 0") == (False, "ZeroDivisionError: division by zero")
    assert run_python("import math, json; print(math.gcd(12, 18), json.dumps([1]))") == (True, "6 [1]\n")
    assert run_python("import sys; sys.exit(3)") == (False, "exit status 3")
    assert run_python(None)[0] is False and run_python("print('a\0')")[0] is False


def test_sandbox_kills_an_infinite_loop_within_the_timeout():
    for code in ("while True: pass", "while True: print('x' * 1000)"):
        t0 = time.monotonic()
        ok, msg = run_python(code, timeout=1.0)
        assert not ok and ("timed out" in msg or "CPU" in msg) and time.monotonic() - t0 < 3.0, msg


def test_sandbox_refuses_to_write_or_remove_files(tmp_path):
    target, kept = tmp_path / "written", tmp_path / "kept"
    kept.write_text("x")
    for code in (f"open({str(target)!r}, 'w').write('x')", f"open({str(target)!r}, 'a')",
                 f"import os; os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import os; os.remove({str(kept)!r})", f"import os; os.rename({str(kept)!r}, {str(target)!r})",
                 f"import os; os.mkdir({str(tmp_path / 'dir')!r})"):
        ok, msg = run_python(code)
        assert not ok and "refused" in msg, (code, msg)
    assert os.listdir(tmp_path) == ["kept"] and kept.read_text() == "x"


def test_sandbox_refuses_network_processes_and_ctypes():
    for code in ("import socket; socket.socket()", "import subprocess", "import os; os.system('true')",
                 "import os; os.fork()", "import sys; sys.modules['posix'].execv('/bin/true', ['true'])",
                 "import ctypes", "import urllib.request"):
        ok, msg = run_python(code)
        assert not ok and "refused" in msg, (code, msg)


def test_sandbox_truncates_output_and_stops_a_memory_hog():
    ok, out = run_python("print('x' * 100_000)", max_output=100)
    assert ok and out == "x" * 100
    for code in ("x = bytearray(1 << 30)", "x = [0] * 10 ** 9"):
        assert run_python(code, memory_mb=256) == (False, "MemoryError")
