"""
rollout.py: a chat policy's episodes in data/envs.py's environments, for RL (rl.py) and evaluation
(eval.py --tasks=chat), and GRPO's objective on them (rl.py's steps 3-6, where its docstring states
the maths). Read data/envs.py, data/chat.py and generate.py's generate_batch first.

An episode is one conversation: the prompt (system turn with the reasoning switch and any stated
budget or effort, the user's task), then the policy's assistant turns. A turn that calls a tool
("<tool>name: argument</tool>", data/envs.py's protocol) is cut right after the call, the
environment's answer is appended as a tool turn, and the policy goes on; the turn without a call is
the final answer, which the environment grades (envs.verify). All live episodes decode together,
one batched generate_batch call per turn. The tokens the policy sampled carry mask 1 (what RL
trains on), the prompt and tool turns mask 0: the same split as data/sft/prepare.py's loss masks.

The conditions an episode can be asked for, all in its system turn:
  reasoning 'on' / 'off'   "/think" or "/no_think" (data/chat.py)
  budget B                 "Think for at most B tokens." : the thinking should end within B tokens
  low effort               "Low effort." : rl.py's reward then also counts the tokens spent
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from data.chat import THINK_CLOSE, budget_line, chat_prompt
from data.envs import MAX_TURNS, Task, final_answer, run_tool, tasks, tool_call, verify
from generate import generate_batch

LOW_EFFORT = "Low effort."


@dataclass
class Episode:
    task: Task
    reasoning: str = "on"            # "on" or "off"
    budget: Optional[int] = None     # thinking tokens the system turn allows (None: no limit stated)
    low_effort: bool = False
    seed: int = 0                    # its sampling: the same seed draws the same tokens in any batch
    tokens: list = field(default_factory=list)  # the conversation's token ids, prompt first
    mask: list = field(default_factory=list)    # 1 on the tokens the policy sampled, 0 on the rest
    replies: list = field(default_factory=list)  # the assistant's turns as text
    thinking: int = 0                # tokens of the first turn before </think> (all of it if unclosed)
    spent: int = 0                   # tokens the policy sampled, over all turns
    reward: float = 0.0              # envs.verify of the final answer: correctness in [0, 1]
    done: bool = False
    skipped: str = ""                # why it never ran or stopped early: "context", "length", "turns"
    error: str = ""                  # the verifier's exception, if it raised (the reward is then 0)
    forced: bool = False             # its thinking was ended at the budget (run_episodes' force_budget)


def opening(task, reasoning="on", budget=None, low_effort=False):
    """The prompt text of an episode: the system turn (the switch, then any budget and effort lines),
    the user's task, and the assistant's opening (data/chat.py's chat_prompt)."""
    system = "\n".join(([budget_line(budget)] if budget else []) + ([LOW_EFFORT] if low_effort else []))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task.prompt}]
    return chat_prompt(messages, reasoning)


def first_prefix(tokenizer, ids, test):
    """The length of the shortest prefix of ids whose text passes test (len(ids) + 1 if none does):
    a prefix's text only grows with it, so test, once true, stays true and a bisection finds it."""
    lo, hi = 0, len(ids) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= len(ids) and test(tokenizer.decode(ids[:mid])):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cut_after(tokenizer, ids, marker):
    """The shortest prefix of ids whose text holds marker (all of ids if none does)."""
    return ids[:first_prefix(tokenizer, ids, lambda text: marker in text)]


def thinking_tokens(tokenizer, ids, reasoning):
    """The tokens of a first assistant turn's thinking (ids: the tokens it sampled; the opening <think>
    is in the prompt): those before its </think>, all of them if it never came; 0 with reasoning off,
    whose turn starts after an empty <think></think>."""
    if reasoning == "off":
        return 0
    at = tokenizer.decode(ids).find(THINK_CLOSE)
    if at < 0:
        return len(ids)
    return first_prefix(tokenizer, ids, lambda text: len(text) > at) - 1  # the longest ending before the marker


def run_episodes(model, tokenizer, episodes, max_new_tokens, eot, temperature=1.0, top_k=None,
                 max_turns=MAX_TURNS, max_len=None, max_batch=64, compile=False, force_budget=False):
    """Play every episode to its end, in place: each turn, the live ones decode together. eot: the token
    that ends the conversation (the policy samples it: mask 1). An episode whose prompt passes
    max_len tokens (the model's context) never runs, skipped="context", reward 0; one whose turns
    filled the context stops there, skipped="length", reward 0;
    one still calling tools after max_turns turns stops with skipped="turns", reward 0.
    force_budget: an episode with a stated budget B thinks for at most B tokens; if its thinking has
    not ended by then, "</think>" is put after them (read, mask 0; Nemotron's budget control) and it
    answers in the next turn. Else the thinking must end by itself, or the episode scores 0.
    Returns the episodes."""
    for ep in episodes:
        ep.tokens = tokenizer.encode(opening(ep.task, ep.reasoning, ep.budget, ep.low_effort))
        ep.mask = [0] * len(ep.tokens)
    for turn in range(max_turns):
        live = [ep for ep in episodes if not ep.done]
        for ep in live:  # no room left: a prompt past the context never runs; a conversation that filled it stops
            if max_len is not None and len(ep.tokens) + 1 > max_len:
                ep.done, ep.skipped = True, "context" if turn == 0 else "length"
        live = [ep for ep in live if not ep.done]
        if not live:
            break
        room = [max_new_tokens if max_len is None else min(max_new_tokens, max_len - len(ep.tokens)) for ep in live]
        forcing = [force_budget and turn == 0 and ep.reasoning == "on" and bool(ep.budget) for ep in live]
        room = [min(n, ep.budget) if f else n for n, ep, f in zip(room, live, forcing)]
        seeds = [(ep.seed * 1_000_003 + turn) % 2 ** 62 for ep in live]
        requests = generate_batch(model, [ep.tokens for ep in live], room, temperature=temperature, top_k=top_k,
                                  seed=seeds, stop=(eot,), max_batch=max_batch, compile=compile)
        for ep, req, forced in zip(live, requests, forcing):
            ids = list(req.tokens)
            text = tokenizer.decode(ids)
            if turn == 0:
                ep.thinking = thinking_tokens(tokenizer, ids, ep.reasoning)
            call = tool_call(final_answer(text))
            if forced and req.finish == "length" and THINK_CLOSE not in text and turn + 1 < max_turns:
                close = tokenizer.encode(f"\n{THINK_CLOSE}\n")  # the budget is spent: the thinking ends here
                ep.replies.append(text)
                ep.tokens += ids + close
                ep.mask += [1] * len(ids) + [0] * len(close)
                ep.forced = True
            elif call is not None and turn + 1 < max_turns:  # a tool call: cut after it, the tool answers
                ids = cut_after(tokenizer, ids, "</tool>")
                tool_turn = tokenizer.encode(f"\n<|tool|>\n{run_tool(ep.task, *call)}\n<|assistant|>\n")
                ep.replies.append(tokenizer.decode(ids))
                ep.tokens += ids + tool_turn
                ep.mask += [1] * len(ids) + [0] * len(tool_turn)
            else:
                ended = req.finish == "stop"  # the policy sampled eot: it is trained on too
                ep.replies.append(text)
                ep.tokens += ids + [eot] * ended
                ep.mask += [1] * (len(ids) + ended)
                ep.done = True
                ep.skipped = "turns" if call is not None else ""
    for ep in episodes:
        if not ep.done:
            ep.done, ep.skipped = True, "turns"
        ep.spent = sum(ep.mask)
        unclosed = ep.reasoning == "on" and ep.replies and THINK_CLOSE not in ep.replies[0] and not ep.forced
        if not (ep.skipped or not ep.replies or unclosed):
            ep.reward = verify(ep.task, ep.replies[-1], on_error=lambda e, ep=ep: setattr(ep, "error", repr(e)))
    return episodes


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def evaluate(model, tokenizer, envs, n, eot, reasoning="on", budget=None, max_new_tokens=256, max_turns=MAX_TURNS,
             max_len=None, max_batch=64, compile=False, force_budget=False, samples=0):
    """Held-out scores, greedy: n tasks per environment from the split training never draws (data/envs.py
    HELDOUT). Returns {env: {"accuracy": mean reward, "thinking": mean thinking tokens, "skipped": prompts
    past the context (scored 0), "within_budget": share of thinking within budget (when one is stated)}}.
    samples = k > 0 adds "best_of_k": k episodes per task sampled at temperature 1, as GRPO's groups are,
    and the mean over tasks of the best reward among them (pass@k for a 0/1 reward): what RL can find."""
    episodes = [Episode(t, reasoning, budget) for env in envs for t in tasks(env, n, "heldout")]
    run_episodes(model, tokenizer, episodes, max_new_tokens, eot, temperature=0.0, max_turns=max_turns,
                 max_len=max_len, max_batch=max_batch, compile=compile, force_budget=force_budget)
    sampled = [Episode(ep.task, reasoning, budget, seed=j * samples + i)
               for j, ep in enumerate(episodes) for i in range(samples)]
    run_episodes(model, tokenizer, sampled, max_new_tokens, eot, temperature=1.0, max_turns=max_turns,
                 max_len=max_len, max_batch=max_batch, compile=compile, force_budget=force_budget)
    scores = {}
    for env in envs:
        mine = [e for e in episodes if e.task.env == env]
        ran = [e for e in mine if e.skipped != "context"]
        scores[env] = {"accuracy": mean(e.reward for e in mine), "thinking": mean(e.thinking for e in ran),
                       "skipped": len(mine) - len(ran)}
        if budget:
            scores[env]["within_budget"] = mean(e.thinking <= budget for e in ran)
        if samples:  # (len(mine) * samples,) episodes, task-major -> (len(mine), samples) rewards
            group = [e.reward for e in sampled if e.task.env == env]
            scores[env]["best_of_k"] = mean(max(group[i:i + samples]) for i in range(0, len(group), samples))
    return scores


# -----------------------------------------------------------------------------
# GRPO's objective (rl.py runs it; its docstring numbers the steps)


def shaped(ep, low_effort_lambda, budget_penalty=0.0):
    """Step 3, the episode's reward: correctness; -budget_penalty if the thinking ran past a stated
    budget (0: no credit; above 0, worse than a wrong answer that kept it); in low effort minus
    low_effort_lambda per token spent."""
    r = -budget_penalty if ep.budget is not None and ep.thinking > ep.budget else ep.reward
    return r - low_effort_lambda * ep.spent if ep.low_effort else r


def advantages(rewards, eps=1e-6):
    """Step 4: rewards (groups, G) -> A (groups, G), each against its group: (r - mean) / (std + eps)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, unbiased=False, keepdim=True) + eps)


def group_filter(rewards):
    """Step 5: (groups,) bool, the groups that teach something: not all their rewards equal."""
    return rewards.amax(1) > rewards.amin(1)


def token_logprobs(net, tokens):
    """tokens (B, T) -> (B, T-1): log pi(tokens[:, t+1] | tokens[:, :t+1])."""
    logits, _ = net(tokens[:, :-1])  # (B, T-1, vocab)
    return torch.gather(F.log_softmax(logits.float(), -1), 2, tokens[:, 1:, None]).squeeze(2)


def grpo_loss(logp, old_logp, adv, mask, n_tokens, clip_eps, kl_coef=0.0, ref_logp=None):
    """Step 6's loss over this batch's sampled tokens (mask), summed and divided by n_tokens (those of
    the whole minibatch, every rank's): logp, old_logp, ref_logp, mask (B, T); adv (B,). Returns the
    loss, and the sums over the sampled tokens of the k3 KL and of the tokens whose ratio was clipped."""
    ratio = torch.exp(logp - old_logp)  # rho_t
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        per_token = per_token + kl_coef * kl
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return (per_token * mask).sum() / n_tokens, (kl.detach() * mask).sum(), (clipped * mask).sum()
