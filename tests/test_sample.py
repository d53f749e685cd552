"""
sample.py end to end on a tiny untrained model: an out_dir ckpt.pt, an HF folder with and without a
tokenizer.json, greedy output equal to model.generate, and bad input. sample.py runs in this process
(helpers.run_script), which saves a torch import each.

    python -m pytest -q tests/test_sample.py
"""
import json
import os
import sys

import pytest
import torch

from helpers import run_script
from model import Nemotron, NemotronConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=64, pattern="M*-E", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
            headdim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)


def run_sample(*args):
    p = run_script("sample.py", *args)
    return p.returncode, p.stdout, p.stderr


def greedy(path, ids, n=8):
    model = Nemotron.from_pretrained(str(path)).eval()
    return model.generate(torch.tensor([ids]), n, temperature=0)[0].tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same tiny model as an out_dir (ckpt.pt + a meta.json copy) and as an HF folder."""
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    cfg = NemotronConfig(**TINY)
    model = Nemotron(cfg)
    out_dir = root / "out"
    out_dir.mkdir()
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict(),
                "config": {"dataset": "no_such_dataset"}}, out_dir / "ckpt.pt")
    (out_dir / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256}))
    model.save_pretrained(str(root / "hf"))
    return root


def test_out_dir_greedy_matches_generate(saved):
    prompt = saved / "prompt.txt"
    prompt.write_text("def f(x):\n    return", encoding="utf-8")
    rc, out, err = run_sample(f"--init_from={saved / 'out'}", f"--start=FILE:{prompt}",
                              "--temperature=0", "--max_new_tokens=8", "--device=cpu")
    assert rc == 0, err
    ids = list(prompt.read_bytes())
    expected = bytes(greedy(saved / "out", ids)).decode("utf-8", errors="replace")
    assert expected in out
    assert "tok/s" in err and "Traceback" not in err


def test_hf_folder_without_tokenizer_falls_back_to_bytes(saved):
    rc, out, err = run_sample(f"--init_from={saved / 'hf'}", "--start=hello", "--temperature=0",
                              "--max_new_tokens=8", "--num_samples=2")
    assert rc == 0, err
    assert "using UTF-8 bytes" in err
    expected = bytes(greedy(saved / "hf", list(b"hello"))).decode("utf-8", errors="replace")
    assert out.count(expected) == 2  # greedy: both samples are the same


def test_hf_folder_with_tokenizer_json(saved, tmp_path):
    import tokenizers
    folder = tmp_path / "hf_tok"
    folder.mkdir()
    for f in os.listdir(saved / "hf"):
        (folder / f).write_bytes((saved / "hf" / f).read_bytes())
    vocab = {f"w{i}": i for i in range(256)}  # a word-level tokenizer as wide as the model
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    rc, out, err = run_sample(f"--init_from={folder}", "--start=w1 w2 w3", "--temperature=0",
                              "--max_new_tokens=8", "--top_k=5", "--top_p=0.9")
    assert rc == 0, err
    assert "using UTF-8 bytes" not in err
    assert tok.decode(greedy(folder, [1, 2, 3])) in out


def test_missing_init_from(saved):
    rc, out, err = run_sample(f"--init_from={saved / 'missing_dir'}", "--max_new_tokens=4")
    assert rc != 0
    assert "Traceback" not in err and "error:" in err and "missing_dir" in err


@pytest.mark.parametrize("bad", ["corrupt.pt", "no_ckpt_dir", "prompt_file"])
def test_bad_input_is_one_clear_message(saved, bad):
    path = saved / bad
    args = [f"--init_from={path}"]
    if bad == "corrupt.pt":
        path.write_bytes(b"not a checkpoint")
    elif bad == "no_ckpt_dir":
        path.mkdir()
    else:
        args = [f"--init_from={saved / 'out'}", f"--start=FILE:{path}"]
    rc, out, err = run_sample(*args, "--max_new_tokens=4")
    assert rc == 1
    assert err.startswith("error:") and str(path) in err


# -----------------------------------------------------------------------------
# reasoning controls: chat format, thinking budget (with forced logits)

def sample_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sample_mod", os.path.join(REPO, "sample.py"))
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["sample.py"]
    try:
        spec.loader.exec_module(mod)  # defines the globals and functions; main() only runs as __main__
    finally:
        sys.argv = argv
    return mod


class ScriptedHead(torch.nn.Module):
    """An LM head that ignores its input and makes greedy decoding spell out `text`, byte by byte."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.i = list(text.encode()), 0
        self.register_buffer("weight", torch.zeros(1))  # new_cache reads the head's device and dtype

    def forward(self, h):
        logits = torch.full((h.shape[0], 256), -1e9)
        logits[:, self.ids[min(self.i, len(self.ids) - 1)]] = 0.0
        self.i += 1
        return logits


def steered(prompt, script, budget, grace):
    """The text greedy decoding produces after `prompt` with a thinking budget, the head forced to `script`."""
    from data.tokenizer import ByteTokenizer
    sample = sample_module()
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY)).eval()
    model.lm_head = ScriptedHead(script)
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    steer = sample.ThinkingBudget(tok, ids, budget, grace)
    out = model.generate_stream(torch.tensor([ids]), len(script) + 12, temperature=0, steer=steer)
    return tok.decode([t.item() for t in out])


def test_chat_prompt_switches_thinking():
    sample = sample_module()
    on, off = sample.chat_prompt("2+2?", "on"), sample.chat_prompt("2+2?", "off")
    assert "/think\n" in on and on.endswith("<|assistant|>\n<think>\n")
    assert "/no_think\n" in off and off.endswith("<think></think>\n")
    nano = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert sample.chat_prompt("hi", "off", nano + "{# /no_think #}") == "[system:/no_think][user:hi]<a>"
    llama = nano + "{# detailed thinking #}"
    assert sample.chat_prompt("hi", "on", llama) == "[system:detailed thinking on][user:hi]<a>"


def test_thinking_budget_closes_at_the_next_newline():
    """Budget 4: past it, the section closes right after the first newline within the grace window."""
    text = steered("<think>\n", "abcdef\nghijklmnop", budget=4, grace=8)
    assert text.startswith("abcdef\n</think>\nghij"), repr(text)


def test_thinking_budget_closes_at_once_without_a_newline():
    """Budget 2, grace 3: no newline by the 6th thinking token, which is replaced by the closing."""
    text = steered("<think>\n", "abcdefghijklmnop", budget=2, grace=3)
    assert text.startswith("abcde\n</think>\ngh"), repr(text)


def test_thinking_budget_leaves_answers_alone():
    """Thinking off (an empty section in the prompt) or no section at all: nothing is forced; a
    section the model opens itself is counted from its opening."""
    assert steered("<think></think>\n", "abcdefghij", budget=2, grace=1) == "abcdefghij" + "j" * 12
    assert steered("plain ", "abcdefghij", budget=2, grace=1) == "abcdefghij" + "j" * 12
    assert steered("x", "<think>abcdefgh", budget=2, grace=1).startswith("<think>abc\n</think>\ne")


def test_sample_py_reasoning_flags(tmp_path):
    torch.manual_seed(0)
    Nemotron(NemotronConfig(**TINY)).save_pretrained(tmp_path / "hf")
    rc, out, err = run_sample(f"--init_from={tmp_path / 'hf'}", "--reasoning=on", "--reasoning_budget=3",
                              "--max_new_tokens=50", "--temperature=0", "--start=why")
    assert rc == 0 and "<|assistant|>\n<think>\n" in out and "</think>" in out.split("<think>\n", 1)[1], err[-2000:]
    rc, _, err = run_sample(f"--init_from={tmp_path / 'hf'}", "--reasoning=maybe")
    assert rc == 1 and "'on' or 'off'" in err and "Traceback" not in err
