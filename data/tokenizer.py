"""
data/tokenizer.py: the on-disk format of a data set and the tokenizers its meta.json names. Shared by
train.py, sample.py and every data/<name>/prepare.py; read it before any of them.

A data set is a folder data/<name>/ holding
  train.bin, val.bin  raw uint32 token ids, no header: np.memmap(path, dtype=np.uint32, mode="r").
                      uint32 because Nemotron's vocabulary (131072) does not fit in uint16.
  meta.json           {"vocab_size": int, "tokenizer": kind, ...}, where kind is one of
                        "bytes"     UTF-8 bytes, vocab 256
                        "chars"     + "chars": the sorted list of characters; id = index in it
                        "tiktoken"  + "encoding": a tiktoken encoding name ("gpt2", "o200k_base")
                        "hf"        + "tokenizer_file": a Hugging Face tokenizer.json (a relative path
                                    is taken from the data-set folder)
                      Optional: "eot", the end-of-text id that starts each document (train.py's
                      doc_masking needs it); "loss_mask": true when the two files below exist.
  train.mask, val.mask  optional, uint8, one per token: 1 where the token is a training target, 0
                      where it is only read (a prompt whose answer alone is taught, as in SFT).
write_dataset() writes meta.json last, so a folder whose meta.json exists is complete.
"""
import json, os, sys
import numpy as np
import tiktoken

class DataError(Exception):
    """Missing or malformed data-set files, or a tokenizer that cannot load: callers print it and exit."""

# ----------------------------------------------------------------------------
# the data-set folder

REQUIRED = {"bytes": [], "chars": ["chars"], "tiktoken": ["encoding"], "hf": ["tokenizer_file"]}

def check_meta(meta, where="meta"):
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise DataError(f"{where}: expected a JSON object with an integer 'vocab_size'")
    if meta.get("tokenizer") not in REQUIRED:
        raise DataError(f"{where}: 'tokenizer' is {meta.get('tokenizer')!r}, expected one of {list(REQUIRED)}")
    missing = [k for k in REQUIRED[meta["tokenizer"]] if k not in meta]
    if missing:
        raise DataError(f"{where}: tokenizer kind {meta['tokenizer']!r} needs {missing}")
    eot = meta.get("eot")
    if eot is not None and (type(eot) is not int or not 0 <= eot < meta["vocab_size"]):
        raise DataError(f"{where}: 'eot' is {eot!r}, expected a token id below vocab_size {meta['vocab_size']}")
    return meta

def read_meta(data_dir):
    """The checked meta.json of a data-set folder; DataError if it is missing or malformed."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: prepare the data set first (python data/<name>/prepare.py)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    check_meta(meta, path)
    if meta["tokenizer"] == "hf":  # resolve it here, so that load_tokenizer(read_meta(d)) finds it
        meta["tokenizer_file"] = os.path.join(data_dir, meta["tokenizer_file"])
    return meta

def open_tokens(data_dir, split, meta, scan=1 << 24):
    """data_dir/<split>.bin as a read-only uint32 np.memmap, checked first: it exists, holds a whole
    number of tokens and at least one, as many as meta.json records (write_dataset records them), and
    ids below meta's vocab_size (every id of a file up to `scan` tokens, else 64 evenly spread runs
    of scan/64). DataError names the file and what is wrong with it."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: prepare the data set again")
    size = os.path.getsize(path)
    if size == 0 or size % 4:
        raise DataError(f"{path}: {size} bytes, not a whole (non-zero) number of uint32 tokens: prepare it again")
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and len(tokens) != expected:
        raise DataError(f"{path}: {len(tokens):,} tokens, but meta.json records {expected:,} (truncated or "
                        f"replaced?): prepare the data set again")
    runs = [tokens] if len(tokens) <= scan else \
        [tokens[s:s + scan // 64] for s in np.linspace(0, len(tokens) - scan // 64, 64).astype(np.int64)]
    top = max(int(run.max()) for run in runs)
    if top >= meta["vocab_size"]:
        raise DataError(f"{path}: token id {top} is not below meta.json's vocab_size {meta['vocab_size']}")
    return tokens

def check_dataset(data_dir, block_size, doc_masking=False):
    """The meta.json of a data set that train.py can sample windows of block_size + 1 tokens from:
    both splits pass open_tokens and are longer than block_size, their loss masks (if meta.json
    says loss_mask) hold one byte per token, and doc_masking has an end-of-text id. DataError otherwise."""
    meta, name = read_meta(data_dir), os.path.basename(os.path.normpath(data_dir))
    if doc_masking and meta.get("eot") is None:
        raise DataError(f"doc_masking needs documents separated by an end-of-text token, and data/{name}/meta.json "
                        f"names none ('eot')")
    for split in ("train", "val"):
        n = len(open_tokens(data_dir, split, meta))
        if n <= block_size:
            raise DataError(f"block_size={block_size} does not fit data/{name}/{split}.bin ({n:,} tokens)")
        mask = os.path.join(data_dir, f"{split}.mask")
        if meta.get("loss_mask") and (not os.path.exists(mask) or os.path.getsize(mask) != n):
            raise DataError(f"data/{name}/meta.json says loss_mask, but {split}.mask is missing or not one byte "
                            f"per token: prepare the data set again")
    return meta

def _replace_atomically(path, write):
    # write a temp file beside the target, then rename: an interrupted run never leaves a half file
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)

def write_dataset(out_dir, train, val, meta, masks=None):
    """Write train.bin, val.bin (uint32), the loss masks train.mask, val.mask (uint8) if masks =
    (train's, val's) is given, and then meta.json (with token counts added); returns the meta."""
    train, val = np.asarray(train, dtype=np.uint32), np.asarray(val, dtype=np.uint32)
    assert len(train) and len(val), "both splits need tokens"
    assert max(train.max(), val.max()) < meta["vocab_size"], "token id out of vocabulary"
    meta = check_meta({**meta, "train_tokens": len(train), "val_tokens": len(val),
                       **({"loss_mask": True} if masks else {})})
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # old meta + new train.bin must never pass for a complete data set
    _replace_atomically(os.path.join(out_dir, "train.bin"), train.tofile)
    _replace_atomically(os.path.join(out_dir, "val.bin"), val.tofile)
    for split, tokens, mask in zip(("train", "val"), (train, val), masks or ()):
        mask = np.asarray(mask, dtype=np.uint8)
        assert mask.shape == tokens.shape, f"{split}: one mask entry per token"
        _replace_atomically(os.path.join(out_dir, f"{split}.mask"), mask.tofile)
    _replace_atomically(meta_path, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return meta

# ----------------------------------------------------------------------------
# tokenizers: encode(str) -> list[int], decode(list[int]) -> str, vocab_size, eot (id or None), and
# meta (what meta.json needs to load the same tokenizer again)

class ByteTokenizer:
    vocab_size, eot, meta = 256, None, {"tokenizer": "bytes", "vocab_size": 256}
    def encode(self, text): return list(text.encode("utf-8"))
    def decode(self, ids): return bytes(ids).decode("utf-8", errors="replace")  # ids may cut a character

class CharTokenizer:
    def __init__(self, chars):
        self.itos, self.stoi = list(chars), {c: i for i, c in enumerate(chars)}
        self.vocab_size, self.eot = len(self.itos), None
        self.meta = {"tokenizer": "chars", "vocab_size": self.vocab_size, "chars": self.itos}
    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise DataError(f"characters {unknown} are not in this data set's vocabulary")
        return [self.stoi[c] for c in text]
    def decode(self, ids): return "".join(self.itos[i] for i in ids)

class TiktokenTokenizer:
    def __init__(self, enc):  # enc: a tiktoken.Encoding, e.g. from tiktoken_encoding("gpt2")
        self.enc, self.vocab_size = enc, enc.n_vocab
        self.eot = enc.encode_single_token("<|endoftext|>") if "<|endoftext|>" in enc.special_tokens_set else None
        self.meta = {"tokenizer": "tiktoken", "vocab_size": enc.n_vocab, "encoding": enc.name}
    def encode(self, text): return self.enc.encode_ordinary(text)  # "<|endoftext|>" in text is just text
    def decode(self, ids): return self.enc.decode(ids)  # replaces invalid UTF-8, like ByteTokenizer

def tiktoken_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError when offline, ValueError for an unknown name, ...
        raise DataError(f"tiktoken could not load encoding {name!r} (it downloads its vocabulary on first "
                        f"use; no network?): {type(e).__name__}: {str(e)[:200]}") from None

class HFTokenizer:
    def __init__(self, path):  # path: a tokenizer.json
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("this tokenizer is a Hugging Face tokenizer.json: pip install tokenizers") from None
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path} not found")
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.meta = {"tokenizer": "hf", "vocab_size": self.vocab_size, "tokenizer_file": os.path.abspath(path)}
        # end of text: the eos_token of a checkpoint's tokenizer_config.json if there is one
        eos, config = "<|endoftext|>", os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                eos = json.load(f).get("eos_token") or eos
        self.eot = self.tok.token_to_id(eos["content"] if isinstance(eos, dict) else eos)
    def encode(self, text): return self.tok.encode(text, add_special_tokens=False).ids  # no BOS added
    def decode(self, ids): return self.tok.decode(ids, skip_special_tokens=False)

def load_tokenizer(meta_or_path):
    """The tokenizer of a meta dict, a data-set folder (its meta.json) or a folder with a tokenizer.json
    (a Hugging Face checkpoint). Raises DataError with a clear message when it cannot."""
    if isinstance(meta_or_path, dict):
        meta = check_meta(meta_or_path)
    elif os.path.isfile(os.path.join(meta_or_path, "tokenizer.json")):
        return HFTokenizer(os.path.join(meta_or_path, "tokenizer.json"))
    else:
        meta = read_meta(meta_or_path)
    kind = meta["tokenizer"]
    if kind == "bytes":
        tok = ByteTokenizer()
    elif kind == "chars":
        tok = CharTokenizer(meta["chars"])
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(tiktoken_encoding(meta["encoding"]))
    else:  # "hf"
        tok = HFTokenizer(meta["tokenizer_file"])
    if meta.get("eot") is not None:  # the data set's end of text (e.g. "\0" of the byte sets): where a document ends
        tok.eot = meta["eot"]
    return tok

class TextStream:
    """Generated text as tokens arrive, for streaming it (sample.py, serve.py): add(ids) returns
    what is new since the last call. It holds back an incomplete UTF-8 character (a trailing U+FFFD)
    and any tail that may begin a stop string; a stop string ends the text before it (.stopped).
    prompt: the ids already there, whose text (.text at the start) is not returned and never
    searched for stops. Ids past the tokenizer's vocabulary (a padded vocab's) have no text."""
    def __init__(self, tokenizer, stops=(), prompt=()):
        self.tok, self.stops, self.stopped = tokenizer, list(stops), False
        self.ids = [t for t in prompt if t < tokenizer.vocab_size]
        self.text = tokenizer.decode(self.ids)
        self.start = self.sent = len(self.text)

    def add(self, ids, final=False):
        self.ids += [t for t in ids if t < self.tok.vocab_size]
        text = self.tok.decode(self.ids)
        for s in self.stops:
            at = text.find(s, self.start)
            if at >= 0:
                text, final, self.stopped = text[:at], True, True
        if not final:
            text = text.rstrip("\ufffd")
            hold = max([n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            text = text[:len(text) - hold]
        new, self.sent, self.text = text[self.sent:], max(self.sent, len(text)), text
        return new

# ----------------------------------------------------------------------------
# the tokenizer of a trained model (sample.py, eval.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def saved_config(path):
    """The train.py flags saved in an out_dir's / ckpt.pt's checkpoint (a dict; {} when none)."""
    import torch  # here, so that the prepare.py scripts do not pay for importing torch
    ckpt_path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    try:  # mmap: reads only the small config entries, not the weights
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt.get("config") or {}
    except Exception:  # no ckpt.pt, or one that mmap cannot read (an old format)
        return {}

def saved_dataset(path):
    """The data set named in a train.py out_dir's / ckpt.pt's saved config, or None."""
    return saved_config(path).get("dataset")

def find_tokenizer(path, vocab_size):
    """The tokenizer for the model at path: a tokenizer.json or meta.json beside the checkpoint, then
    data/<dataset>/meta.json of the run's data set; bytes for a 256-token model with neither."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidates = [folder]
    dataset = None if os.path.isfile(os.path.join(folder, "config.json")) else saved_dataset(path)
    if dataset:
        candidates.append(os.path.join(REPO, "data", dataset))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "tokenizer.json")) or os.path.isfile(os.path.join(d, "meta.json")):
            return load_tokenizer(d)
    looked = ", ".join(os.path.join(d, "tokenizer.json or meta.json") for d in candidates)
    if vocab_size == 256:
        print(f"no tokenizer found ({looked}): the model has 256 tokens, using UTF-8 bytes", file=sys.stderr)
        return ByteTokenizer()
    raise DataError(f"no tokenizer found for a {vocab_size}-token model (looked for {looked})")
