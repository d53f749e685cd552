"""
Tests for post-training's RL: rollout.py's episodes (tool turns, masks, the context limit, a verifier
that raises), GRPO's maths against hand computations, rl.py end to end on a trivially learnable
environment (its reward rises) and on bad input, and eval.py --tasks=chat.

Run: python -m pytest -q tests/test_rl.py     (about a minute on 2 cores)
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rollout
from data import envs
from data.envs import Task
from data.tokenizer import ByteTokenizer
from generate import Request
from helpers import run_script
from model import Nemotron, NemotronConfig
from rollout import Episode, advantages, group_filter, grpo_loss, run_episodes, shaped

TINY = dict(vocab_size=256, d_model=32, pattern="M*", n_head=2, n_kv_head=1, head_dim=16, d_ff=64, mamba_heads=2,
            mamba_head_dim=16, d_state=8, chunk_size=8)
TOK = ByteTokenizer()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# GRPO's maths


def test_advantages_and_filter_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.3]])
    A = advantages(r)
    # group 0: mean 0.5, population std 0.5 -> +-1; group 1: all equal -> 0; group 2: mean 0.075, std sqrt(0.016875)
    assert torch.allclose(A[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(A[1], torch.zeros(4))
    s = math.sqrt((3 * 0.075 ** 2 + 0.225 ** 2) / 4)
    assert torch.allclose(A[2], torch.tensor([-0.075 / s] * 3 + [0.225 / s]), atol=1e-4)
    assert group_filter(r).tolist() == [True, False, True]
    assert group_filter(torch.ones(2, 3)).tolist() == [False, False]  # all solved: dropped too


def test_grpo_loss_by_hand():
    """Two sequences of three positions, the last of the second masked out; ratios inside and outside
    the clip band on both sides of 1, for a positive and a negative advantage; the KL term."""
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.9], [0.2, 0.6, 0.1]]))
    old = torch.log(torch.tensor([[0.5, 0.2, 0.5], [0.4, 0.55, 0.1]]))
    ref = torch.log(torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.2, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, eps, beta, n = torch.tensor([2.0, -1.0]), 0.2, 0.1, 5.0
    loss, kl, clipped = grpo_loss(logp, old, adv, mask, n, eps, beta, ref)
    total, kl_sum, n_clipped = 0.0, 0.0, 0
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            rho = math.exp(logp[b, t] - old[b, t])
            surrogate = min(rho * adv[b], min(max(rho, 1 - eps), 1 + eps) * adv[b])
            q = float(ref[b, t] - logp[b, t])
            k3 = math.exp(q) - q - 1
            total += -surrogate + beta * k3
            kl_sum += k3
            n_clipped += abs(rho - 1) > eps
    assert math.isclose(loss.item(), total / n, rel_tol=1e-5)
    assert math.isclose(kl.item(), kl_sum, rel_tol=1e-5) and clipped.item() == n_clipped == 3


def test_shaped_reward_budget_and_low_effort():
    ep = Episode(Task("math", 0, "", "1", ""), budget=10, reward=1.0, thinking=10, spent=50)
    assert shaped(ep, 0.01) == 1.0
    ep.thinking = 11
    assert shaped(ep, 0.01) == 0.0  # past the stated budget: no credit
    wrong_within = Episode(ep.task, budget=10, reward=0.0, thinking=10)
    assert shaped(ep, 0.01, budget_penalty=0.5) == -0.5 < shaped(wrong_within, 0.01, 0.5) == 0.0  # below wrong
    ep.budget, ep.low_effort = None, True
    assert math.isclose(shaped(ep, 0.01), 1.0 - 0.5)

# -----------------------------------------------------------------------------
# rollouts with a scripted policy


def scripted(replies):
    """A stand-in for generate_batch: each call answers the prompts with the next texts of replies
    (a list per call); a text ending in "\\0" stops there (finish "stop"), else it ran out ("length")."""
    calls = iter(replies)

    def fake(model, prompts, max_new_tokens, **kw):
        out = []
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        for prompt, text, limit in zip(prompts, next(calls), limits):
            req = Request(list(prompt), limit, stop=kw.get("stop", ()))
            for t in TOK.encode(text):
                if req.take(t):
                    break
            req.finish = req.finish or "length"
            out.append(req)
        return out
    return fake


def tools_task():
    return Task("tools", 0, "Q", "7", "", {"store": {"x": 3, "y": 4}})


def test_tool_turns_masks_and_final_answer(monkeypatch):
    """Turn 1 calls lookup (and runs on past the call: cut), turn 2 calc, turn 3 answers: the tool
    turns are read (mask 0), the policy's tokens and its closing end-of-text trained (mask 1), and
    only the last turn is graded."""
    monkeypatch.setattr(rollout, "generate_batch", scripted([
        ["plan</think>\n<tool>lookup: x</tool>\n<|tool|> made up"], ["<tool>calc: 3 + 4</tool>"], ["7\0"]]))
    ep = run_episodes(None, TOK, [Episode(tools_task(), "on")], 64, eot=0, max_turns=3)[0]
    text = TOK.decode(ep.tokens)
    assert "made up" not in text and "<|tool|>\n3\n<|assistant|>\n" in text and "<|tool|>\n7\n" in text
    assert ep.replies == ["plan</think>\n<tool>lookup: x</tool>", "<tool>calc: 3 + 4</tool>", "7\0"[:-1]]
    assert ep.reward == 1.0 and ep.thinking == len("plan") and ep.tokens[-1] == 0 and ep.mask[-1] == 1
    sampled = TOK.decode([t for t, m in zip(ep.tokens, ep.mask) if m])
    assert sampled == "plan</think>\n<tool>lookup: x</tool><tool>calc: 3 + 4</tool>7\0"
    assert ep.spent == len(sampled.encode())


def test_demonstrated_tool_use_fits_the_default_turns(monkeypatch):
    """The tools environment's own demonstrations (two lookups, a calc, the answer), played back
    as the policy under the default turn limit (rl.py's and eval.py's --max_turns), finish and score 1: a limit
    below a demonstration's turns would score every tool episode 0 whatever the model learned."""
    longest = 0
    for task in envs.tasks("tools", 40):
        replies = [m["content"] for m in envs.demonstration(task) if m["role"] == "assistant"]
        longest = max(longest, len(replies))
        monkeypatch.setattr(rollout, "generate_batch", scripted([[r + "\0" * (i == len(replies) - 1)]
                                                                 for i, r in enumerate(replies)]))
        ep = run_episodes(None, TOK, [Episode(task, "on")], 256, eot=0)[0]
        assert not ep.skipped and ep.reward == 1.0, (task.seed, ep.replies)
    assert longest == 4 < envs.MAX_TURNS  # two lookups, calc, answer; one turn to spare


def test_unclosed_thinking_context_and_turn_limits(monkeypatch):
    monkeypatch.setattr(rollout, "generate_batch", scripted([["7 but never closed", "<tool>lookup: x</tool>"]]))
    long_task = Task("math", 0, "x" * 400, "7", "")
    eps = [Episode(Task("math", 0, "Q", "7", ""), "on"), Episode(tools_task(), "off"), Episode(long_task, "off")]
    run_episodes(None, TOK, eps, 64, eot=0, max_turns=1, max_len=300)
    assert eps[0].reward == 0.0 and not eps[0].skipped  # reasoning on without </think>: no answer
    assert eps[1].skipped == "turns" and eps[1].reward == 0.0  # still calling tools at the last turn
    assert eps[2].skipped == "context" and eps[2].reward == 0.0 and eps[2].spent == 0


def test_a_forced_budget_closes_the_thinking_and_the_answer_follows(monkeypatch):
    """force_budget: the first turn gets B new tokens (6, and 20 for the second episode); unclosed at B,
    "</think>" is put in (read, mask 0) and the next turn answers; a turn that closes by itself within
    B is left alone."""
    calls = []

    def fake(model, prompts, max_new_tokens, **kw):
        calls.append(max_new_tokens)
        return scripted([["thinking on and on", "ok</think>\n7\0"], ["7\0"]])(model, prompts, max_new_tokens, **kw) \
            if len(calls) == 1 else scripted([["7\0"]])(model, prompts, max_new_tokens, **kw)
    monkeypatch.setattr(rollout, "generate_batch", fake)
    eps = [Episode(Task("math", 0, "Q", "7", ""), "on", budget=6),
           Episode(Task("math", 1, "Q", "7", ""), "on", budget=20)]
    run_episodes(None, TOK, eps, 64, eot=0, max_turns=2, force_budget=True)
    assert calls[0] == [6, 20]
    forced, closed = eps
    assert forced.forced and forced.thinking == 6 and forced.reward == 1.0 and "</think>" in TOK.decode(forced.tokens)
    assert TOK.decode([t for t, m in zip(forced.tokens, forced.mask) if not m]).endswith("\n</think>\n")
    assert not closed.forced and closed.reward == 1.0 and closed.thinking == 2
    eps = [Episode(Task("math", 0, "Q", "7", ""), "on", budget=6)]  # the same, not forced: no answer, reward 0
    monkeypatch.setattr(rollout, "generate_batch", scripted([["thinking on and on"], ["7\0"]]))
    run_episodes(None, TOK, eps, 64, eot=0, max_turns=2)
    assert eps[0].reward == 0.0 and not eps[0].forced


def test_best_of_k_scores_each_task_by_its_best_sample(monkeypatch):
    """evaluate(samples=k): k episodes a task at temperature 1, every one its own seed, and each task
    scored by the best of its own k (rewards set by task and sample here, whatever the batch order)."""
    k, table = 4, [[0, 0, 0, 0], [0, 1, 0, 0], [0.25, 0.75, 0, 0]]  # (task, sample) -> reward
    seen = []

    def fake(model, tokenizer, episodes, max_new_tokens, eot, temperature=1.0, **kw):
        for ep in episodes:
            j = ep.task.seed - envs.HELDOUT
            ep.reward = 0.5 * (j == 2) if temperature == 0 else table[j][ep.seed % k]
            seen.append((temperature, ep.task.seed, ep.seed))
    monkeypatch.setattr(rollout, "run_episodes", fake)
    scores = rollout.evaluate(None, TOK, ["math"], 3, eot=0, samples=k)["math"]
    assert scores["best_of_k"] == pytest.approx((0 + 1 + 0.75) / 3) and scores["accuracy"] == pytest.approx(0.5 / 3)
    sampled = [s for s in seen if s[0] == 1.0]
    assert len(sampled) == 3 * k and len({seed for _, _, seed in sampled}) == 3 * k
    assert "best_of_k" not in rollout.evaluate(None, TOK, ["math"], 3, eot=0)["math"]


def test_a_conversation_that_fills_the_context_stops_as_length(monkeypatch):
    monkeypatch.setattr(rollout, "generate_batch", scripted([["<tool>lookup: x</tool>"]]))
    ep = Episode(tools_task(), "off")
    n = len(TOK.encode(rollout.opening(ep.task, "off")))
    run_episodes(None, TOK, [ep], 64, eot=0, max_turns=3, max_len=n + 30)  # the tool turn leaves no room
    assert ep.skipped == "length" and ep.reward == 0.0 and len(ep.replies) == 1


def test_a_verifier_that_raises_scores_zero_and_is_recorded(monkeypatch):
    def broken(task, final):
        raise RuntimeError("grader bug")
    monkeypatch.setitem(envs.ENVIRONMENTS, "math", (envs.ENVIRONMENTS["math"][0], broken))
    monkeypatch.setattr(rollout, "generate_batch", scripted([["7\0"]]))
    ep = run_episodes(None, TOK, [Episode(Task("math", 0, "Q", "7", ""), "off")], 8, eot=0)[0]
    assert ep.reward == 0.0 and "grader bug" in ep.error

# -----------------------------------------------------------------------------
# rl.py and eval.py end to end


def lowercase_task(rng):
    return "Say something.", "abc", "", {}


def lowercase_share(task, final):
    """The share of lowercase ASCII letters in the answer: a dense reward a random policy starts near 0.1 on."""
    return sum("a" <= c <= "z" for c in final) / max(len(final), 1)


@pytest.fixture
def chat_ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = NemotronConfig(**TINY)
    out = tmp_path / "sft"
    out.mkdir()
    torch.save({"model": Nemotron(cfg).state_dict(), "model_config": cfg.to_dict(),
                "config": {"dataset": "none", "block_size": 256}}, out / "ckpt.pt")
    (out / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256, "eot": 0}))
    return out


def rl_on_lower(chat_ckpt, out, monkeypatch, *flags):
    """rl.py on the learnable "lower" environment with these flags added; the finished run."""
    monkeypatch.setitem(envs.ENVIRONMENTS, "lower", (lowercase_task, lowercase_share))
    monkeypatch.setattr(envs, "ENVS", (*envs.ENVS, "lower"))
    p = run_script("rl.py", f"--init_from={chat_ckpt}", f"--out_dir={out}", "--envs=lower", "--think_frac=0",
                   "--eval_tasks=2", "--device=cpu", *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_best_is_the_start_until_a_step_beats_it(chat_ckpt, tmp_path, monkeypatch):
    """An RL run that never beats its starting policy still leaves best.pt: the start, step 0."""
    out = tmp_path / "rl"
    p = rl_on_lower(chat_ckpt, out, monkeypatch, "--steps=1", "--prompts_per_step=2", "--group_size=2",
                    "--max_new_tokens=4", "--learning_rate=0")
    assert "at step 0" in p.stdout and torch.load(out / "best.pt")["iter_num"] == 0
    assert torch.load(out / "ckpt.pt")["iter_num"] == 1
    rl_on_lower(chat_ckpt, out, monkeypatch, "--steps=1", "--prompts_per_step=2", "--group_size=2",
                "--max_new_tokens=4", "--overwrite=True")  # a second run there starts a new log
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert sum("config" in r for r in records) == 1 and [r["step"] for r in records if "filtered" in r] == [1]


def test_rl_raises_the_reward_of_a_learnable_environment(chat_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "rl"
    rl_on_lower(chat_ckpt, out, monkeypatch, "--steps=20", "--prompts_per_step=4", "--group_size=8",
                "--max_new_tokens=12", "--learning_rate=1e-2", "--eval_interval=20")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    rewards = [r["lower"]["reward"] for r in records if "lower" in r]
    assert len(rewards) == 20 and all(0 <= r["filtered"] <= 1 for r in records if "filtered" in r)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards  # measured: 0.13 -> 0.79 over the 20 steps
    assert (out / "ckpt.pt").exists() and (out / "meta.json").exists()
    model = Nemotron.from_pretrained(str(out))  # the same checkpoint format as train.py's
    assert model.config.d_model == TINY["d_model"]


def test_rl_bad_input(chat_ckpt, tmp_path):
    p = run_script("rl.py", f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'a'}", "--envs=math,poetry")
    assert p.returncode == 2 and "poetry" in p.stderr and "math, code, instruct, tools, ruler" in p.stderr
    p = run_script("rl.py", f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'b'}", "--env_weights=1,2")
    assert p.returncode == 2 and "one weight" in p.stderr
    p = run_script("rl.py", "--init_from=out-sft-missing", f"--out_dir={tmp_path / 'c'}")
    assert p.returncode == 2 and "no such checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_eval_chat_prints_one_json_object(chat_ckpt):
    p = run_script("eval.py", "--tasks=chat", f"--init_from={chat_ckpt}", "--n=2", "--envs=math,instruct",
                   "--max_new_tokens=8", "--reasoning_budget=4", "--best_of=2", "--json=True")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)  # nothing else on stdout
    assert set(result["envs"]) == {"math", "instruct"} and result["reasoning_budget"] == 4
    for s in result["envs"].values():
        assert 0 <= s["accuracy_on"] <= 1 and 0 <= s["accuracy_off"] <= 1 and 0 <= s["within_budget"] <= 1
        assert 0 <= s["best_of_k"] <= 1
    assert result["mean_best_of"] == pytest.approx(sum(s["best_of_k"] for s in result["envs"].values()) / 2)
    p = run_script("eval.py", "--tasks=chat", f"--init_from={chat_ckpt}", "--n=2", "--envs=math", "--max_new_tokens=8",
                   "--json=True")  # no budget: the random model thinks for all its 8 tokens, never closing
    assert p.returncode == 0 and json.loads(p.stdout)["envs"]["math"]["thinking_on"] == 8, p.stdout
    p = run_script("eval.py", "--tasks=chat", f"--init_from={chat_ckpt}", "--envs=chess")
    assert p.returncode == 2 and "chess" in p.stderr


def test_two_ranks_train_as_one_process(chat_ckpt, tmp_path):
    """torchrun with 2 ranks (gloo) against one process: the same prompts, samples (every episode its
    own seed), minibatches and token-level normalisation, so the same weights after 3 steps (measured:
    5e-8 apart, 0.03 moved). Low effort makes the rewards differ within groups (tokens spent) while
    every answer is wrong, so there is a gradient."""
    flags = [f"--init_from={chat_ckpt}", "--envs=instruct,math", "--steps=3", "--prompts_per_step=4", "--group_size=4",
             "--max_new_tokens=40", "--eval_interval=3", "--eval_tasks=1", "--device=cpu", "--learning_rate=1e-2",
             "--low_effort_frac=1", "--low_effort_lambda=0.01", "--think_frac=0"]
    p = run_script("rl.py", *flags, f"--out_dir={tmp_path / 'one'}")
    assert p.returncode == 0, p.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    q = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "rl.py",
                        *flags, f"--out_dir={tmp_path / 'two'}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "ckpt.pt")["model"] for d in ("one", "two"))
    start = torch.load(chat_ckpt / "ckpt.pt")["model"]
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-3  # it trained
    assert max((one[k] - two[k]).abs().max() for k in one) < 1e-5
