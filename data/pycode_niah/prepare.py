"""
data/pycode_niah/prepare.py: pycode mixed with RULER needle retrieval, for the Star Attention experiment
(README "Long context"): a model learns retrieval at a few hundred tokens and is tested far beyond.
Read data/tokenizer.py and data/ruler.py first.
Run: python data/pycode_niah/prepare.py              (about 10 s; builds data/pycode first if missing)
     python data/pycode_niah/prepare.py --frac=0.8   (80% retrieval, into data/pycode_niah_80)

The stream alternates a slice of pycode (random length 256-1024 bytes, in order through the split) with
one RULER sample (niah_single_1 or niah_multikey_2, noise or needle haystack, at a random length of
400-750 byte tokens) followed by its answer and a blank line, until the retrieval samples make up
`frac` of the tokens. Byte tokens, like pycode. Train and val draw different seeds, so no val needle
or key is trained on.
"""
import os, random, sys
import numpy as np
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.*`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizer import ByteTokenizer, read_meta, write_dataset
from data import ruler
from data.pycode.prepare import prepare as prepare_pycode

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ["niah_single_1", "niah_multikey_2"]

def mix(text, n_tokens, frac, seed):
    """About n_tokens byte tokens: slices of text (uint32 array) alternating with RULER samples."""
    rng, out, pos, size = random.Random(seed), [], 0, 0
    while size < n_tokens:
        if rng.random() < frac:
            task, length = rng.choice(TASKS), rng.randrange(400, 751, 50)
            s = ruler.generate(task, length, n=1, seed=rng.getrandbits(32))[0]
            piece = np.frombuffer((s["input"] + s["answer"] + "\n\n").encode(), dtype=np.uint8).astype(np.uint32)
        else:
            n = rng.randrange(256, 1025)
            piece, pos = text[pos:pos + n], (pos + n) % max(len(text) - 1024, 1)
        out.append(piece)
        size += len(piece)
    return np.concatenate(out)

def prepare(out_dir=HERE, train_tokens=8_000_000, val_tokens=400_000, frac=0.5):
    """Build data/pycode_niah: train.bin, val.bin, meta.json. Returns the meta dict."""
    pycode = os.path.join(os.path.dirname(HERE), "pycode")
    if not os.path.exists(os.path.join(pycode, "meta.json")):
        prepare_pycode(pycode)
    read_meta(pycode)
    train, val = (np.memmap(os.path.join(pycode, f"{s}.bin"), dtype=np.uint32, mode="r") for s in ("train", "val"))
    meta = {**ByteTokenizer.meta, "source": "pycode + RULER niah", "retrieval_fraction": frac, "tasks": TASKS}
    meta = write_dataset(out_dir, mix(train, train_tokens, frac, 0), mix(val, val_tokens, frac, 1), meta)
    print(f"{os.path.basename(out_dir)}: train {meta['train_tokens']:,} tokens | val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="pycode mixed with RULER needle retrieval")
    ap.add_argument("--frac", type=float, default=0.5, help="fraction of the tokens in retrieval samples")
    args = ap.parse_args()
    if not 0 <= args.frac <= 1:
        sys.exit(f"error: --frac={args.frac}: expected a fraction between 0 and 1")
    name = "pycode_niah" if args.frac == 0.5 else f"pycode_niah_{round(args.frac * 100)}"
    prepare(os.path.join(os.path.dirname(HERE), name), frac=args.frac)
