"""
data/pycode_niah/prepare.py: pycode mixed with RULER needle retrieval, for the Star Attention experiment
(README "Long context"): a model learns retrieval at a few hundred tokens and is tested far beyond.
Read data/tokenizer.py and data/ruler.py first.
Run: python data/pycode_niah/prepare.py              (about 10 s; builds data/pycode first if missing)
     python data/pycode_niah/prepare.py --frac=0.4 --drills=0.2  (into data/pycode_niah_40_20)
     python data/pycode_niah/prepare.py --drills_only (copy drills alone, into data/copy_drills)
     python data/pycode_niah/prepare.py --prefix=needle (answer prefix = the needle's words, into
                                                       data/pycode_niah_needle; data/ruler.py PREFIX)

The stream alternates a slice of pycode (random length 256-1024 bytes, in order through the split) with
one RULER sample (niah_single_1 or niah_multikey_2, noise or needle haystack, at a random length of
400-750 byte tokens) followed by its answer and a blank line, until the retrieval samples make up
`frac` of the tokens; a `drills` fraction of the tokens are copy drills (below). Byte tokens, like
pycode. Train and val draw different seeds, so no val needle or key is trained on.

Loss masks (train.mask, val.mask): pycode is trained on every token, a RULER sample on its answer
only, a drill on its copy only. What a model must learn here is retrieval, and the haystacks' filler
sentences would otherwise dominate the loss. The default mix is 70% retrieval, 25% drills and 5%
pycode by tokens, which is about 70 answer, 200 copy and 300 text targets in a batch of 8 x 768:
with more text its targets would swamp the answers' (a sample of ~600 tokens has ~10 answer bytes).

Copy drills: 128 tokens, s + " . . ." + s with s 8-24 random bytes; the loss is on the second copy
(from its second token on), which lies 64-119 tokens after the first, beyond the sliding window of
config/star_copy.py's W layers (16), so only the global NoPE layers can learn it. It is the
induction-head task (Olsson et al. 2022) that NIAH retrieval builds on: trained on NIAH alone the
model stays on the loss plateau (LOG.md, stops 13 and 14). The drills follow each other in one
stream, with no start token and no document boundary: a model trained on drills that each began
with "\0" as a document of their own learnt to copy only right after a "\0" (LOG.md, stop 15).
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

DRILL = 128  # tokens per copy drill

def drill(rng):
    """One copy drill (tokens, loss mask), DRILL tokens: s, a gap of " ." pairs, s again, spaces."""
    s = [rng.randrange(1, 256) for _ in range(rng.randrange(8, 25))]
    gap = DRILL - 1 - 2 * len(s) - rng.randrange(0, 40)  # 40..111 tokens, then 1..40 spaces
    filler = [32, 46] * gap
    tokens = s + filler[:gap] + s + [32] * DRILL
    mask = [0] * (len(s) + gap + 1) + [1] * (len(s) - 1) + [0] * DRILL
    return tokens[:DRILL], mask[:DRILL]

def mix(text, n_tokens, frac, seed, drills=0.0, prefix="ruler"):
    """About n_tokens byte tokens and their loss mask (uint8 arrays): slices of text (uint32 array)
    alternating with RULER samples, and copy drills."""
    rng, out, masks, pos, size = random.Random(seed), [], [], 0, 0
    while size < n_tokens:
        r = rng.random()
        if r < drills:
            piece, mask = drill(rng)
        elif r < drills + frac:
            task, length = rng.choice(TASKS), rng.randrange(400, 751, 50)
            s = ruler.generate(task, length, n=1, seed=rng.getrandbits(32), prefix=prefix)[0]
            prompt, answer = s["input"].encode(), (s["answer"] + "\n\n").encode()
            piece = list(prompt + answer)
            mask = [0] * len(prompt) + [1] * len(answer)
        else:
            n = rng.randrange(256, 1025)
            piece, pos = text[pos:pos + n], (pos + n) % max(len(text) - 1024, 1)
            mask = [1] * len(piece)
        out.append(np.asarray(piece, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=np.uint8))
        size += len(piece)
    return np.concatenate(out), np.concatenate(masks)

def prepare(out_dir=HERE, train_tokens=8_000_000, val_tokens=400_000, frac=0.7, drills=0.25, prefix="ruler"):
    """Build a data set folder (train.bin, val.bin, the loss masks, meta.json). Returns the meta dict."""
    pycode = os.path.join(os.path.dirname(HERE), "pycode")
    if not os.path.exists(os.path.join(pycode, "meta.json")):
        prepare_pycode(pycode)
    read_meta(pycode)
    train, val = (np.memmap(os.path.join(pycode, f"{s}.bin"), dtype=np.uint32, mode="r") for s in ("train", "val"))
    meta = {**ByteTokenizer.meta, "source": "pycode + RULER niah + copy drills",
            "retrieval_fraction": frac, "drill_fraction": drills, "tasks": TASKS, "answer_prefix": prefix}
    (tx, tm), (vx, vm) = (mix(t, n, frac, seed, drills, prefix) for t, n, seed in ((train, train_tokens, 0), (val, val_tokens, 1)))
    meta = write_dataset(out_dir, tx, vx, meta, masks=(tm, vm))
    print(f"{os.path.basename(out_dir)}: train {meta['train_tokens']:,} tokens | val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="pycode mixed with RULER needle retrieval and copy drills")
    ap.add_argument("--frac", type=float, default=0.7, help="fraction of the tokens in retrieval samples")
    ap.add_argument("--drills", type=float, default=0.25, help="fraction of the tokens in copy drills")
    ap.add_argument("--drills_only", action="store_true", help="copy drills alone, into data/copy_drills")
    ap.add_argument("--prefix", default="ruler", choices=["ruler", "needle"],
                    help="NIAH answer prefix (data/ruler.py PREFIX); 'needle' writes data/pycode_niah_needle")
    args = ap.parse_args()
    if args.drills_only:
        args.frac, args.drills = 0.0, 1.0
    if not (0 <= args.frac <= 1 and 0 <= args.drills <= 1 and args.frac + args.drills <= 1):
        sys.exit(f"error: --frac={args.frac}, --drills={args.drills}: expected fractions summing to at most 1")
    name = "copy_drills" if args.drills_only else \
        "pycode_niah" if (args.frac, args.drills) == (0.7, 0.25) else f"pycode_niah_{round(args.frac * 100)}_{round(args.drills * 100)}"
    name += "_needle" if args.prefix == "needle" and not args.drills_only else ""
    prepare(os.path.join(os.path.dirname(HERE), name), frac=args.frac, drills=args.drills, prefix=args.prefix,
            **({"train_tokens": 4_000_000, "val_tokens": 200_000} if args.drills_only else {}))
