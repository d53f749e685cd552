"""
sample.py end to end on a tiny untrained model: an out_dir ckpt.pt, an HF folder with and without a
tokenizer.json, greedy output equal to model.generate, and bad input. sample.py runs in this process
(helpers.run_script), which saves a torch import each. Then the reasoning controls, and the sampling
distribution: generate.probabilities against a float64 reference of temperature / top-k / top-p, and
model.generate's draws against that distribution within 4 standard errors.

    python -m pytest -q tests/test_sample.py
"""
import json
import os
import sys

import pytest
import torch

from data.chat import ChatError, ThinkingBudget, chat_prompt
from helpers import assert_close, run_script
from generate import generate_stream
from model import Nemotron, NemotronConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=64, pattern="M*-E", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
            mamba_head_dim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)


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


def test_compiled_greedy_matches_generate(saved):
    """--compile=True: static caches and the compiled one-token step, the same greedy text."""
    rc, out, err = run_sample(f"--init_from={saved / 'out'}", "--start=def f(x):", "--temperature=0",
                              "--max_new_tokens=8", "--compile=True")
    assert rc == 0, err
    assert bytes(greedy(saved / "out", list(b"def f(x):"))).decode("utf-8", errors="replace") in out
    rc, out, err = run_sample(f"--init_from={saved / 'out'}", "--compile=True", "--star_block=4")
    assert rc == 1 and err.startswith("error:") and "static caches" in err


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
# reasoning controls (data/chat.py): chat format, thinking budget (with forced logits)

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
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY)).eval()
    model.lm_head = ScriptedHead(script)
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    steer = ThinkingBudget(tok, ids, budget, grace)
    out = generate_stream(model, torch.tensor([ids]), len(script) + 12, temperature=0, steer=steer)
    return tok.decode([t.item() for t in out])


def test_chat_prompt_switches_thinking():
    on, off = chat_prompt("2+2?", "on"), chat_prompt("2+2?", "off")
    assert "/think\n" in on and on.endswith("<|assistant|>\n<think>\n")
    assert "/no_think\n" in off and off.endswith("<think></think>\n")
    nano = ("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")
    assert chat_prompt("hi", "off", nano + "{# /no_think #}") == "[system:/no_think][user:hi]<a>"
    llama = nano + "{# detailed thinking #}"
    assert chat_prompt("hi", "on", llama) == "[system:detailed thinking on][user:hi]<a>"


def test_chat_prompt_takes_turns_and_reads_the_switch_from_the_system_prompt():
    turns = [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    text = chat_prompt(turns)
    assert text == ("<|system|>\nBe brief. /no_think\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\n2+2?\n"
                    "<|assistant|>\n<think></think>\n")
    assert chat_prompt(turns, "on").startswith("<|system|>\n/think\nBe brief.")
    assert chat_prompt([{"role": "user", "content": "x"}]).endswith("<|assistant|>\n")  # no switch: none
    for bad in ([], [{"role": "user"}], [{"role": "tool", "content": "x"}], [{"role": "system", "content": "x"}],
                [["user", "x"]]):
        with pytest.raises(ChatError):
            chat_prompt(bad)
    with pytest.raises(ChatError, match="reasoning"):
        chat_prompt("x", "maybe")


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


# -----------------------------------------------------------------------------
# the sampling distribution: temperature, top-k and top-p against a hand-computed reference

def expected_probs(logits, temperature, top_k=None, top_p=None):
    """The distribution generate.probabilities documents, computed by hand in float64 for one row of
    logits (vocab,): p = softmax(logits / T); keep the tokens whose scaled logit is >= the k-th
    largest (ties at the k-th value all stay); renormalise; walk the kept tokens from the most
    likely down and keep each one while the mass of those before it is <= top_p (the smallest set
    whose mass reaches top_p, plus any token that starts exactly at top_p); renormalise.
    Returns the probabilities and the smallest |mass before a token - top_p|, the margin by which
    fp32 rounding could flip a top-p decision (inf without top_p)."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        kth = z.sort(descending=True).values[min(top_k, z.numel()) - 1]
        keep = z >= kth
    p = torch.where(keep, (z - z.max()).exp(), torch.zeros_like(z))
    p = p / p.sum()
    margin = float("inf")
    if top_p is not None:
        before = 0.0
        for i in p.argsort(descending=True).tolist():
            if not keep[i]:
                continue
            margin = min(margin, abs(before - top_p))
            keep[i] = before <= top_p
            before += p[i].item()
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum()
    return p, margin


LOGITS = torch.tensor([[2.3115, -0.4401, -3.2682, 0.8526, -1.6268, -2.0979, 0.6050, 1.2570],
                       [0.1, 1.9, -0.7, 0.4, 2.6, -1.3, 1.1, 0.0]])  # two rows: per-row top-k / top-p
FILTERS = [(None, None), (1, None), (3, None), (8, None), (20, None), (None, 0.3), (None, 0.6),
           (None, 0.95), (3, 0.5), (5, 0.8), (2, 0.99)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k,top_p", FILTERS)
def test_probabilities_match_the_hand_reference(temperature, top_k, top_p):
    """probabilities(logits, T, top_k, top_p) == expected_probs, row by row (two rows with different
    top-k thresholds and top-p cut points, top_k beyond the vocabulary too). fp32 softmax against a
    float64 one of O(1) values: 1e-6. The logits keep every cumulative mass >= 1e-3 from top_p
    (asserted), so rounding cannot move a top-p cut and the filtered-out tokens are exactly 0."""
    from generate import probabilities
    got = probabilities(LOGITS, temperature, top_k, top_p)
    for r in range(LOGITS.size(0)):
        ref, margin = expected_probs(LOGITS[r], temperature, top_k, top_p)
        assert margin > 1e-3, f"row {r}: a cumulative mass within {margin:.1e} of top_p: pick other logits"
        assert_close(got[r], ref, f"row {r}, T={temperature}, top_k={top_k}, top_p={top_p}", atol=1e-6)
        assert torch.equal(got[r] == 0, ref == 0), f"row {r}: a different set of tokens kept"


def test_probabilities_keeps_top_k_ties_and_greedy_is_untouched():
    """Top-k keeps every token tied with the k-th logit (three tokens at 1.5 for k = 1 and 2), as
    expected_probs does; temperature 0 returns the logits themselves (greedy takes their argmax)."""
    from generate import probabilities
    logits = torch.tensor([[0.5, 1.5, 1.5, -0.5, 1.5, -2.0, 0.1, -1.0]])
    for k in (1, 2, 3, 4):
        got = probabilities(logits, 0.7, top_k=k)[0]
        assert_close(got, expected_probs(logits[0], 0.7, k)[0], f"top_k={k} with ties", atol=1e-6)
        assert int((got > 0).sum()) == (3 if k <= 3 else 4)
    assert probabilities(logits, 0, top_k=2, top_p=0.5) is logits


@pytest.fixture(scope="module")
def sharp_model():
    """A tiny hybrid model with an 8-token vocabulary whose LM head is scaled up, so its next-token
    logits spread over ~3 and T = 0.5, 1, 2 give clearly different distributions."""
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY, vocab_size=8)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    return model


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, None, None), (2.0, None, None), (2.0, 4, None),
                                                     (0.5, None, 0.95), (2.0, 5, 0.9)])
def test_generate_samples_the_expected_distribution(sharp_model, temperature, top_k, top_p):
    """The public path: model.generate(prompt, 1, temperature, top_k, top_p) over N = 4000 copies of
    one prompt (one draw each, in one batched forward, seeded) against expected_probs of the
    logits model(prompt) gives for the next token. Tolerance: 4 standard errors of a frequency,
    4 sqrt(p (1 - p) / N) <= 0.032, per token (a fixed seed, so the test is deterministic); tokens
    the filters remove must never be drawn. The same bound is asserted to fail by a wide margin for
    the distribution at T = 1, so a generate that loses the temperature cannot pass."""
    model, N = sharp_model, 4000
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        logits = model(prompt)[0][0, -1]
    p, margin = expected_probs(logits, temperature, top_k, top_p)
    assert margin > 1e-3, "a cumulative mass too close to top_p for a sampling test"
    tol = 4 * (p * (1 - p) / N).sqrt()
    at_t1 = expected_probs(logits, 1.0, top_k, top_p)[0]
    assert ((at_t1 - p).abs() - tol).max() > 0.05, "T and T=1 too close for this test to see a difference"
    torch.manual_seed(1234)
    out = model.generate(prompt.expand(N, -1), 1, temperature=temperature, top_k=top_k, top_p=top_p)
    assert out.shape == (N, 6) and torch.equal(out[:, :5], prompt.expand(N, -1))
    freq = torch.bincount(out[:, -1], minlength=8).double() / N
    assert (freq[p == 0] == 0).all(), f"filtered-out tokens drawn: {freq.tolist()} vs {p.tolist()}"
    worst = int(((freq - p).abs() - tol).argmax())
    assert ((freq - p).abs() <= tol).all(), \
        f"token {worst}: frequency {freq[worst]:.4f} vs p {p[worst]:.4f} (4 SE = {tol[worst]:.4f}); " \
        f"freq {[round(f, 4) for f in freq.tolist()]}, p {[round(f, 4) for f in p.tolist()]}"
