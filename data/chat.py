"""
data/chat.py: the chat format and the reasoning controls, shared by sample.py and serve.py.

Llama-Nemotron switches thinking with the system prompt "detailed thinking on/off", Nemotron-H /
Nano-2 and Nemotron 3 with "/think" and "/no_think"; the thinking goes between <think> and
</think>, and with thinking off the assistant turn starts with an empty <think></think>.
Without a checkpoint's own (Jinja) template, our plain format:
    <|system|>\n/think\n<|user|>\n{user}\n<|assistant|>\n<think>\n              (on)
    <|system|>\n/no_think\n<|user|>\n{user}\n<|assistant|>\n<think></think>\n   (off)
and every earlier turn, a tool's result included, as <|{role}|>\n{content}\n.
"""
import json
import os

import torch

THINK_OPEN, THINK_CLOSE = '<think>', '</think>'
GRACE = 32  # tokens a closing thinking section may run past its budget while waiting for a newline
BUDGETS = (32, 64, 128)  # the thinking budgets the nano recipe states (rl.py, data/sft/prepare.py)
ROLES = ('system', 'user', 'assistant', 'tool')  # tool: a tool's result (data/envs.py)


def budget_line(budget):
    """The system-turn line that states a thinking budget of B tokens (rl.py, eval.py, the SFT set)."""
    return f"Think for at most {budget} tokens."


class ChatError(ValueError):
    """Malformed messages, or a checkpoint's template that fails: callers print it (or answer 400)."""


def chat_template(folder):
    """The Jinja chat template of an HF checkpoint folder, or None."""
    path = os.path.join(folder, 'chat_template.jinja')
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            return f.read()
    path = os.path.join(folder, 'tokenizer_config.json')
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            t = json.load(f).get('chat_template')
        if isinstance(t, list):  # named templates: the default one
            t = next((x['template'] for x in t if x.get('name') == 'default'), None)
        return t
    return None


def check_messages(messages):
    """A list of {"role": system | user | assistant | tool, "content": str}, at least one user turn."""
    if isinstance(messages, str):
        return [{'role': 'user', 'content': messages}]
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
            raise ChatError(f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': a string}}")
    if not any(m['role'] == 'user' for m in messages):
        raise ChatError("messages: no user turn")
    return [{'role': m['role'], 'content': m['content']} for m in messages]


def chat_prompt(messages, reasoning=None, template=None):
    """The text that asks the assistant for its next turn. messages: the user's text, or a list of
    turns (check_messages). reasoning 'on' / 'off' puts the switch in the system prompt (before
    the caller's own system text, if any); None: the switch is whatever the system prompt says,
    if anything. template: a checkpoint's Jinja template (needs jinja2), else the plain format."""
    messages = check_messages(messages)
    if reasoning not in (None, 'on', 'off'):
        raise ChatError(f"reasoning={reasoning!r}: expected 'on' or 'off' (or none)")
    llama = template is not None and 'detailed thinking' in template
    if reasoning is not None:
        switch = ('detailed thinking ' + reasoning) if llama else ('/think' if reasoning == 'on' else '/no_think')
        if messages[0]['role'] == 'system':
            messages[0] = {'role': 'system', 'content': switch + '\n' + messages[0]['content']}
        else:
            messages.insert(0, {'role': 'system', 'content': switch})
    else:  # as the system prompt says
        system = messages[0]['content'] if messages[0]['role'] == 'system' else ''
        reasoning = 'off' if ('/no_think' in system or 'detailed thinking off' in system) else \
            'on' if ('/think' in system or 'detailed thinking on' in system) else None
    if template is None:
        turns = ''.join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        opening = {'on': f'{THINK_OPEN}\n', 'off': f'{THINK_OPEN}{THINK_CLOSE}\n', None: ''}[reasoning]
        return f"{turns}<|assistant|>\n{opening}"
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatError("this checkpoint's chat template is Jinja: pip install jinja2") from None

    def raise_exception(message):
        raise ValueError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals['raise_exception'] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                enable_thinking=reasoning != 'off', bos_token='', eos_token='')
    except Exception as e:  # a template error is the checkpoint's problem, said in one line
        raise ChatError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}") from None


class ThinkingBudget:
    """A steer() for generate.generate_stream: counts the tokens of an open thinking section and,
    once there are more than `budget`, closes it: right after a newline if one comes within
    GRACE more tokens, else at once (the sampled token is then replaced by "\\n</think>\\n")."""

    def __init__(self, tokenizer, prompt_ids, budget, grace=GRACE):
        self.tok, self.budget, self.grace = tokenizer, budget, grace
        self.ids, self.count = list(prompt_ids), 0
        self.thinking = self.is_open()

    def is_open(self):
        tail = self.tok.decode(self.ids[-64:])  # the delimiters are a few tokens at most
        return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)

    def __call__(self, nxt):
        tok = nxt.item()
        if self.thinking:
            self.count += 1
            newline = '\n' in self.tok.decode([tok])
            if self.count > self.budget and (newline or self.count > self.budget + self.grace):
                ids = ([tok] if newline else []) + self.tok.encode(('' if newline else '\n') + THINK_CLOSE + '\n')
                self.ids += ids
                self.thinking = False
                return torch.tensor([ids], dtype=nxt.dtype, device=nxt.device)
        self.ids.append(tok)
        self.thinking = self.is_open()  # the model may open or close a section itself
        return nxt
