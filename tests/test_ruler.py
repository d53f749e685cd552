"""
data/ruler.py (RULER's synthetic tasks) and eval.py (val loss per context length, RULER scores).
The tasks are checked against what RULER defines them to be: prompts that fill the asked number of
tokens of the given tokenizer, needles that are really in the context at the stated depths, answers
that really are the most common / most frequent words, and RULER's string-match score.

    python -m pytest -q tests/test_ruler.py
"""
import collections
import json
import os
import re
import shutil

import pytest
import torch

from data import ruler
from data.tokenizer import ByteTokenizer, DataError
from helpers import run_script
from model import Nemotron, NemotronConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESSAY = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


class WordTokenizer:
    """Whitespace-separated words as tokens: a tokenizer whose token count is far from the byte count."""
    def encode(self, text):
        return [hash(w) % 1000 for w in text.split()]


@pytest.fixture(scope="module")
def essay(tmp_path_factory):
    if os.path.isfile(ESSAY):
        return ESSAY
    path = tmp_path_factory.mktemp("essay") / "essay.txt"  # outside the CI layout: any text will do
    path.write_text(" ".join(f"word{i % 97} and more text{i}." for i in range(5000)))
    return str(path)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WordTokenizer()], ids=["bytes", "words"])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompts_fill_the_length_and_hold_their_answers(task, tokenizer, essay):
    length = 2000 if isinstance(tokenizer, ByteTokenizer) else 600
    samples = ruler.generate(task, length, tokenizer, n=3, seed=1, essay=essay)
    for s in samples:
        n_tokens = len(tokenizer.encode(s["input"]))
        assert n_tokens == s["length"] <= length
        assert n_tokens > 0.9 * length, f"{task}: {n_tokens} tokens for length {length}"
        context = s["input"]
        if task.startswith("niah"):
            for v in s["outputs"]:  # every answer is a needle sentence in the context
                assert re.search(r"One of the special magic \w+ for \S+ is: " + re.escape(v) + r"\.", context)
        elif task == "vt":  # the chain: the first variable holds the value, each next one the previous
            value = re.search(r"assigned the value (\d+)", context).group(1)
            names = s["outputs"]
            assert f"VAR {names[0]} = {value}." in context
            for a, b in zip(names, names[1:]):
                assert context.index(f"VAR {b} = VAR {a}.") > context.index(f"VAR {a} =")
        elif task == "cwe":  # the 10 outputs are exactly the 10 most common list words, above the rest
            words = re.findall(r"\d+\. (\w+)", context.split("\n")[1])
            counts = collections.Counter(words).most_common()
            assert {w for w, _ in counts[:10]} == set(s["outputs"]) and counts[9][1] > counts[10][1]
        else:  # fwe: the 3 most frequent coded words, in order
            words = context.split("coded words. ")[1].split("\n")[0].split(" .... ")
            counts = collections.Counter(words)
            assert [w for w, _ in counts.most_common(3)] == s["outputs"]
        assert s["answer"].strip().rstrip(".").split(", ") == s["outputs"]
        assert s["input"].endswith(s["query"]) and s["query"].startswith(("\nWhat are all", "\nQuestion:"))


def test_deterministic_and_depths_spread():
    a = ruler.generate("niah_single_1", 3000, n=5, seed=7)
    assert a == ruler.generate("niah_single_1", 3000, n=5, seed=7)
    assert a != ruler.generate("niah_single_1", 3000, n=5, seed=8)
    # the single needle of sample i sits at depth (i + 1/2) / n of the context
    contexts = [s["input"].split("afterwards.\n")[1].split("\nWhat are all")[0] for s in a]
    depths = [c.index("One of the special magic") / len(c) for c in contexts]
    for i, d in enumerate(depths):
        assert abs(d - (i + 0.5) / 5) < 0.03, depths


def test_multi_needle_tasks(essay):
    s = ruler.generate("niah_multivalue", 3000, n=1, essay=essay)[0]  # one key, four values
    assert len(set(s["outputs"])) == 4 and s["input"].count("One of the special magic") == 4
    s = ruler.generate("niah_multiquery", 3000, n=1, essay=essay)[0]  # four keys asked at once
    asked = re.search(r"numbers for (.+) mentioned in the provided text\?", s["input"]).group(1)
    assert len(set(s["outputs"])) == 4 and len(re.split(r", and |, ", asked)) == 4
    s = ruler.generate("niah_multikey_2", 3000, n=1)[0]  # a haystack of needles: one is asked for
    assert s["input"].count("One of the special magic numbers for") > 20
    key = re.search(r"numbers for (\S+) mentioned", s["input"]).group(1)
    assert s["input"].count(f"for {key} is:") == 1


def test_score_is_ruler_string_match_all():
    assert ruler.score(["the number is 1234567."], [["1234567"]]) == 100.0
    assert ruler.score(["ABC and xyz"], [["abc", "XYZ", "qq", "rr"]]) == 50.0  # case-insensitive recall
    assert ruler.score(["a", "1234567"], [["1234567"], ["1234567"]]) == 50.0


def test_needle_answer_prefix(essay):
    """prefix="needle" ends the prompt with the needle's own words up to its value, so that the ideal
    answer continues the prompt exactly as the needle continues; the context is RULER's unchanged.
    Tasks with several values or queries refuse it."""
    for task in ("niah_single_1", "niah_multikey_2"):
        a, b = ruler.generate(task, 800, n=3, seed=4), ruler.generate(task, 800, n=3, seed=4, prefix="needle")
        for r, s in zip(a, b):
            assert r["outputs"] == s["outputs"] and r["input"].endswith("mentioned in the provided text are")
            needle_to_value = s["input"][s["input"].rindex("\n") + 1:].split("? ", 1)[1]  # "One of ... is:"
            assert needle_to_value + s["answer"][:-1] in s["input"][:s["input"].rindex("\n")]
    with pytest.raises(DataError, match="one key and one value"):
        ruler.generate("niah_multivalue", 1000, essay=essay, prefix="needle")
    with pytest.raises(DataError, match="unknown answer prefix"):
        ruler.generate("niah_single_1", 1000, prefix="nope")


def test_bad_input():
    with pytest.raises(ruler.TooShort, match="too short"):
        ruler.generate("niah_single_1", 100)
    with pytest.raises(DataError, match="essay"):
        ruler.generate("niah_single_2", 1000)
    with pytest.raises(DataError, match="unknown RULER task"):
        ruler.generate("niah", 1000)


# -----------------------------------------------------------------------------
# eval.py end to end on a tiny untrained model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = NemotronConfig(d_model=32, pattern="W*", n_head=2, n_kv_head=1, head_dim=16, sliding_window=16,
                         swan_train_len=64)
    model = Nemotron(cfg)
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict(),
                "config": {"dataset": "pycode"}}, root / "ckpt.pt")
    return root, model


def run_eval(*args):
    p = run_script("eval.py", *args)
    return p.returncode, p.stdout, p.stderr


def test_eval_loss_and_ruler(out_dir, tmp_path):
    root, model = out_dir
    if not os.path.isfile(os.path.join(REPO, "data", "pycode", "val.bin")):
        pytest.skip("data/pycode is not prepared")
    out = tmp_path / "r.json"
    rc, stdout, stderr = run_eval(f"--init_from={root}", "--lengths=64,512", "--loss_tokens=1024",
                                  "--tasks=niah_single_1", "--n=2", "--swan=off", "--star_blocks=0,128",
                                  f"--json_out={out}")
    assert rc == 0, stderr
    r = json.loads(out.read_text())
    assert r["swan_train_len"] is None  # --swan=off reached the model
    assert set(r["loss"]) == {"64", "512"} and all(3 < v < 8 for v in r["loss"].values())  # ~log(256)
    assert r["ruler"]["niah_single_1|full|64"]["score"] is None  # the prompt needs more than 64 tokens
    cell = r["ruler"]["niah_single_1|full|512"]
    assert len(cell["predictions"]) == 2 and 0 <= cell["score"] <= 100
    star = r["ruler"]["niah_single_1|star128|512"]  # Star Attention over 128-token blocks ran too
    assert len(star["predictions"]) == 2 and 0 <= star["score"] <= 100
    assert r["agreement"]["niah_single_1|star128|512"] in (0.0, 50.0, 100.0)  # of 2 prompts
    assert "niah_single_1 full" in stdout and "n/a" in stdout
    # the loss at 64 is the mean loss of the evenly spaced val sequences, as computed here
    import numpy as np
    data = np.memmap(os.path.join(REPO, "data", "pycode", "val.bin"), dtype=np.uint32, mode="r")
    model.config.swan_train_len = None
    for m in model.modules():
        if hasattr(m, "swan_len"):
            m.swan_len = None
    starts = np.linspace(0, len(data) - 65, 1024 // 64).astype(np.int64)
    xy = torch.stack([torch.from_numpy(data[s:s + 65].astype(np.int64)) for s in starts])
    with torch.no_grad():
        expected = model.eval()(xy[:, :-1], xy[:, 1:])[1].item()
    assert abs(r["loss"]["64"] - expected) < 1e-4


@pytest.mark.parametrize("args,message", [
    (["--lengths=abc"], "comma-separated integers"),
    (["--tasks=nope"], "unknown RULER task"),
    (["--swan=maybe"], "--swan="),
    (["--dataset=no_such_set"], "not found"),
])
def test_eval_bad_flags(out_dir, args, message):
    rc, _, err = run_eval(f"--init_from={out_dir[0]}", "--lengths=64", *args)
    assert rc == 1 and message in err


def test_eval_reads_the_runs_document_start_and_answer_prefix(tmp_path):
    """A run trained with doc_masking gets each RULER prompt started with its data set's end-of-text
    token (--bos=auto), and the answer prefix its data set was built with (--answer_prefix=auto);
    --bos=off and an explicit prefix override them."""
    name = f"_test_eval_{os.getpid()}"
    data = os.path.join(REPO, "data", name)
    os.makedirs(data)
    try:
        with open(os.path.join(data, "meta.json"), "w") as f:
            json.dump({"tokenizer": "bytes", "vocab_size": 256, "eot": 0, "answer_prefix": "needle"}, f)
        cfg = NemotronConfig(d_model=32, pattern="W*", n_head=2, n_kv_head=1, head_dim=16, sliding_window=16)
        torch.save({"model": Nemotron(cfg).state_dict(), "model_config": cfg.to_dict(),
                    "config": {"dataset": name, "doc_masking": True}}, tmp_path / "ckpt.pt")
        common = (f"--init_from={tmp_path}", "--dataset=none", "--tasks=niah_single_1", "--lengths=400", "--n=1")
        rc, out, err = run_eval(*common)
        assert rc == 0, err
        assert "prompts start with token 0" in out and "answer prefix 'needle'" in out
        rc, out, err = run_eval(*common, "--bos=off", "--answer_prefix=ruler")
        assert rc == 0, err
        assert "prompts start with" not in out and "answer prefix 'ruler'" in out
        rc, _, err = run_eval(*common, "--bos=maybe")
        assert rc == 1 and "--bos=" in err
    finally:
        shutil.rmtree(data)
