"""
Tests for data/: the tokenizer helper (every kind round-trips, clear errors), the data-set format
(uint32 files, meta.json written last) and the three prepare scripts, all offline.
Run: python -m pytest -q tests/test_data.py
"""
import ast, json, os, re, subprocess, sys
import numpy as np
import pytest
import tiktoken

import data.tokenizer as tokenizer
from data.tokenizer import (ByteTokenizer, CharTokenizer, DataError, TiktokenTokenizer, load_tokenizer,
                            read_meta, write_dataset)
from data.pycode import prepare as pycode
from data.fineweb_edu import prepare as fineweb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")  # beside the checkout, in CI too
# no proxy variables: a subprocess must fail on its own bad URL, not on a proxy of this machine
OFFLINE_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

def local_encoding():
    # a byte-level tiktoken encoding built in memory: no vocabulary download, so it works offline
    return tiktoken.Encoding(name="test",
                             pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})

def read_bins(folder):
    return tuple(np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=np.uint32) for s in ("train", "val"))

def run_script(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env or OFFLINE_ENV)

# ----------------------------------------------------------------------------
# tokenizers

TEXT = "def f(x):\n    return x ** 2  # héllo wörld ✓\n"

def test_bytes_round_trip():
    tok = load_tokenizer({"vocab_size": 256, "tokenizer": "bytes"})
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.decode(ids) == TEXT and tok.eot is None
    assert tok.decode(ids[:-3]).endswith("\ufffd")  # a cut character decodes with a replacement mark

def test_chars_round_trip():
    tok = CharTokenizer(sorted(set(TEXT)))
    tok2 = load_tokenizer(tok.meta)
    assert tok2.decode(tok2.encode(TEXT)) == TEXT and tok2.vocab_size == len(set(TEXT))
    with pytest.raises(DataError, match="vocabulary"):
        tok2.encode("Z")

def test_tiktoken_round_trip_with_local_encoding():
    tok = TiktokenTokenizer(local_encoding())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eot == 256 and tok.vocab_size == 257 and tok.meta["encoding"] == "test"
    assert 256 not in tok.encode("a<|endoftext|>b")  # special text in a document is plain text

def test_tiktoken_offline_gives_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match=r"tiktoken could not load encoding 'gpt2' .*no network\?"):
        load_tokenizer({"vocab_size": 50257, "tokenizer": "tiktoken", "encoding": "gpt2"})

def test_hf_tokenizer_folder(tmp_path):
    import tokenizers as tk
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    hf = tk.Tokenizer(tk.models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)  # a Hugging Face checkpoint folder
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eot == 256 and tok.vocab_size == 257
    # the same tokenizer named by a data set's meta.json, with a path relative to the data-set folder
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "meta.json").write_text(json.dumps(
        {"vocab_size": 257, "tokenizer": "hf", "tokenizer_file": "../tokenizer.json"}))
    assert load_tokenizer(tmp_path / "ds").encode("hi") == tok.encode("hi")

def test_meta_errors(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json not found: prepare"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match=r"meta\.json not found"):
        load_tokenizer(tmp_path)
    for bad, pattern in [("{not json", "not valid JSON"), ('{"tokenizer": "bytes"}', "vocab_size"),
                         ('{"vocab_size": 65, "tokenizer": "chars"}', "chars"),
                         ('{"vocab_size": 9, "tokenizer": "sentencepiece"}', "sentencepiece")]:
        (tmp_path / "meta.json").write_text(bad)
        with pytest.raises(DataError, match=pattern):
            read_meta(tmp_path)

# ----------------------------------------------------------------------------
# the data-set format

def test_write_dataset_meta_last(tmp_path, monkeypatch):
    write_dataset(tmp_path, [1, 2, 3], [4], ByteTokenizer.meta)
    assert read_meta(tmp_path)["train_tokens"] == 3 and [a.tolist() for a in read_bins(tmp_path)] == [[1, 2, 3], [4]]
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left
    # a rewrite interrupted after train.bin must not leave the folder looking complete
    real = tokenizer._replace_atomically
    def interrupted(path, write):
        if path.endswith("val.bin"):
            raise KeyboardInterrupt
        real(path, write)
    monkeypatch.setattr(tokenizer, "_replace_atomically", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, [5, 6], [7], ByteTokenizer.meta)
    assert not (tmp_path / "meta.json").exists()

def test_data_modules_import_from_repo_root():
    p = run_script("-c", "from data.tokenizer import load_tokenizer; from data.pycode.prepare import prepare")
    assert p.returncode == 0, p.stderr

# ----------------------------------------------------------------------------
# pycode: the embedded default data set

def split_files(blob):
    # (relpath, content) of each file in a pycode split, cut at its "# file: " header lines
    parts = re.split(rb"^# file: (.+)\n", blob, flags=re.M)
    assert parts[0] == b""
    return [(parts[i].decode(), parts[i + 1]) for i in range(1, len(parts), 2)]

def test_pycode(tmp_path):
    meta = pycode.prepare(tmp_path, max_train_bytes=300_000)
    assert meta == read_meta(tmp_path) and meta["tokenizer"] == "bytes"
    train, val = read_bins(tmp_path)
    assert train.dtype == np.uint32 and train.max() < 256 and 0 < len(train) <= 300_000
    files = dict(pycode.stdlib_files())
    train_files, val_files = split_files(train.astype(np.uint8).tobytes()), split_files(val.astype(np.uint8).tobytes())
    # val is every val file, whole and in order, whatever the train cap
    assert [r for r, _ in val_files] == [r for r in files if pycode.is_val(r)]
    assert not any(pycode.is_val(r) for r, _ in train_files)
    assert not {r for r, _ in train_files} & {r for r, _ in val_files}
    assert not any(part in pycode.SKIP for r in files for part in r.split("/"))
    for relpath, content in val_files + train_files[:5]:
        with open(files[relpath], "rb") as f:
            assert content == f.read(), relpath
        ast.parse(content.decode("utf-8"))  # Python source, byte for byte
    # deterministic: a second run writes the same bytes
    pycode.prepare(tmp_path / "again", max_train_bytes=300_000)
    assert all(np.array_equal(a, b) for a, b in zip(read_bins(tmp_path), read_bins(tmp_path / "again")))

# ----------------------------------------------------------------------------
# shakespeare_char

@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no local tinyshakespeare.txt")
def test_shakespeare_char(tmp_path):
    p = run_script("data/shakespeare_char/prepare.py", f"--input={SHAKESPEARE}", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    tok = load_tokenizer(tmp_path)
    train, val = read_bins(tmp_path)
    assert tok.vocab_size == 65 and len(train) == int(0.9 * len(text))
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text

def test_shakespeare_offline_message(tmp_path):
    p = run_script("data/shakespeare_char/prepare.py", f"--out_dir={tmp_path}", "--url=http://127.0.0.1:9/input.txt")
    assert p.returncode == 1 and "--input" in p.stderr and "Traceback" not in p.stderr
    assert not os.listdir(tmp_path)  # nothing half-written

# ----------------------------------------------------------------------------
# fineweb_edu: BPE through tiktoken

def test_fineweb_tokenize_and_split(tmp_path):
    tok = TiktokenTokenizer(local_encoding())
    docs = [f"document {i}: " + "some educational text. " * (i % 7 + 1) for i in range(200)]
    meta = fineweb.prepare(docs, tok, tmp_path)
    assert meta["tokenizer"] == "tiktoken" and meta["vocab_size"] == 257 and meta["documents"] == 200
    train, val = read_bins(tmp_path)
    assert train[0] == tok.eot and val[0] == tok.eot  # each split starts at a document
    assert 0 < len(val) < 0.05 * len(train)
    stream = np.concatenate([train, val]).tolist()
    assert tok.decode(stream).split("<|endoftext|>")[1:] == docs

def test_fineweb_reads_local_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"doc {i}\n")
    assert fineweb.read_documents(tmp_path / "docs") == ["doc 0\n", "doc 1\n", "doc 2\n"]
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert fineweb.read_documents(str(tmp_path / "d.jsonl")) == ["a", "b"]
    with pytest.raises(DataError, match="not found"):
        fineweb.read_documents(tmp_path / "nope")

def test_fineweb_offline_messages(tmp_path, monkeypatch):
    # no cached vocabulary and no network: a short message and exit code 1, no traceback
    env = {**OFFLINE_ENV, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    p = run_script("data/fineweb_edu/prepare.py", f"--input={tmp_path}", f"--out_dir={tmp_path / 'out'}", env=env)
    assert p.returncode == 1 and "tiktoken could not load encoding 'gpt2'" in p.stderr and "Traceback" not in p.stderr
    # a vocabulary but no network for the documents
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(fineweb, "tiktoken_encoding", lambda name: local_encoding())
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--url=http://127.0.0.1:9/rows?dataset=x", "--num_docs=10", f"--out_dir={tmp_path / 'out'}"])
    assert "could not download" in str(e.value.code) and "--input" in str(e.value.code)
    assert not (tmp_path / "out").exists()

# ----------------------------------------------------------------------------
# pycode_niah: the Star Attention experiment's mix, with loss masks

def test_pycode_niah_mix_and_masks(tmp_path):
    """Every piece of the mix is a document that starts with "\0" (and holds no other) and carries its
    loss mask: a copy drill's mask covers exactly its second copy from the second token on (the first
    copy 56-143 tokens before, beyond a 16-token window, after 0-31 tokens of noise), a RULER sample's
    exactly its answer, pycode's every token; the kinds come in the asked fractions of the tokens, and
    the files agree with meta.json."""
    import random
    from data.pycode_niah import prepare as niah
    rng = random.Random(0)
    for _ in range(50):
        tokens, mask = niah.drill(rng)
        assert len(tokens) == len(mask) == niah.DRILL and tokens[0] == 0 and 0 not in tokens[1:]
        n = sum(mask) + 1  # the copied string s
        second = [i for i, m in enumerate(mask) if m][0] - 1  # where the second copy starts
        first = second - n - next(g for g in range(8, 48)
                                  if tokens[second - n - g:second - g] == tokens[second:second + n])
        assert tokens[first:first + n] == tokens[second:second + n] and 1 <= first <= 32
        assert 56 <= second - first <= 143 and not any(mask[:second + 1])
    text = np.frombuffer(b"x = 1\n" * 2000, dtype=np.uint8).astype(np.uint32)
    tokens, mask = niah.mix(text, 30_000, frac=0.4, seed=0, drills=0.3)
    assert tokens.shape == mask.shape and mask.dtype == np.uint8
    raw = tokens.astype(np.uint8).tobytes()
    answers = list(re.finditer(rb"is:( \d{7}\.\n\n)", raw))  # each RULER answer, and nothing else of it
    assert answers and all(mask[m.start(1):m.end(1)].all() and not mask[m.start():m.start(1)].any() for m in answers)
    code = [m.start() for m in re.finditer(rb"x = 1\n", raw)]
    assert code and mask[code].all()
    docs = np.split(tokens.astype(np.uint8), np.nonzero(tokens == 0)[0][1:])  # "\0" starts every document
    assert tokens[0] == 0 and len(docs) > 30
    is_text = lambda d: set(d[1:].tobytes()) <= set(b"x = 1\n")
    kinds = {"drill": sum(len(d) for d in docs
                          if len(d) == niah.DRILL and not is_text(d) and b"magic" not in d.tobytes()),
             "text": sum(len(d) for d in docs if is_text(d))}
    assert abs(kinds["text"] / len(tokens) - 0.3) < 0.05 and abs(kinds["drill"] / len(tokens) - 0.3) < 0.05
    meta = niah.prepare(tmp_path, train_tokens=20_000, val_tokens=5_000)
    assert meta["loss_mask"] and meta["eot"] == 0 and meta == read_meta(tmp_path)
    for split in ("train", "val"):
        assert os.path.getsize(tmp_path / f"{split}.mask") == meta[f"{split}_tokens"]


def test_text_stream_holds_back_half_characters_and_stop_prefixes():
    """Byte by byte: a two-byte character comes out whole, never as U+FFFD; a tail that may begin
    a stop string waits; the stop string ends the text; the prompt is neither returned nor searched."""
    tok = tokenizer.ByteTokenizer()
    stream = tokenizer.TextStream(tok, stops=["END"], prompt=tok.encode("END of the prompt: "))
    assert stream.text == "END of the prompt: "
    parts = [stream.add([b]) for b in "héllo EN".encode()]
    assert "\ufffd" not in "".join(parts) and parts[1] == "" and parts[2] == "é"
    assert "".join(parts) == "héllo " and not stream.stopped  # "EN" may begin "END": held back
    assert stream.add(list(b"D, more")) == "" and stream.stopped
    plain = tokenizer.TextStream(tok)
    assert "".join(plain.add([b]) for b in "aé".encode()[:-1]) + plain.add([], final=True) == "a\ufffd"


def test_the_data_sets_end_of_text_is_the_tokenizers():
    """meta.json's "eot" becomes the tokenizer's, so that sample.py, serve.py and rollouts stop where
    the data set's documents end (data/sft's "\\0"); one outside the vocabulary is refused."""
    assert load_tokenizer({"tokenizer": "bytes", "vocab_size": 256, "eot": 0}).eot == 0
    assert load_tokenizer({"tokenizer": "bytes", "vocab_size": 256}).eot is None and ByteTokenizer.eot is None
    for bad in (256, -1, "0", 1.5):
        with pytest.raises(DataError, match="eot"):
            load_tokenizer({"tokenizer": "bytes", "vocab_size": 256, "eot": bad})
