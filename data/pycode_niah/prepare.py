"""
data/pycode_niah/prepare.py: RULER needle retrieval mixed with copy drills and pycode, for the Star
Attention experiment (docs/star.md): a model learns retrieval at a few hundred tokens and is
tested far beyond. Read data/tokenizer.py and data/ruler.py first.
Run: python data/pycode_niah/prepare.py              (about 10 s; builds data/pycode first if missing)
     python data/pycode_niah/prepare.py --frac=0.4 --drills=0.5  (into data/pycode_niah_40_50)
     python data/pycode_niah/prepare.py --drills_only (copy drills alone, into data/copy_drills)
     python data/pycode_niah/prepare.py --prefix=ruler (RULER's own answer prefix, into
                                                      data/pycode_niah_ruler; data/ruler.py PREFIX)

Every piece is a document of its own that starts with the end-of-text token "\\0" (meta "eot"; train
with --doc_masking=True, so that no token sees another document): a RULER niah_single_1 sample (noise
haystack, number needle at a random depth, 400-750 byte tokens) followed by its answer and a blank
line, until those make up `frac` of the tokens; a `drills` fraction of copy drills (below); the rest
slices of pycode (256-1024 bytes, in order through the split). Byte tokens, like pycode. Train and
val draw different seeds, so no val needle or key is trained on.

Loss masks (train.mask, val.mask): pycode is trained on every token, a RULER sample on its answer
only, a drill on its copy only; the haystacks' filler sentences would otherwise swamp the ~10 answer
bytes of a sample. The answer prefix is by default the needle's own words ("One of the special magic
numbers for {key} is:", data/ruler.py PREFIX "needle"): retrieval is then an induction, a copy of
what followed the same words before. RULER's prefix asks for a match on the key alone.

Copy drills (Olsson et al. 2022's induction-head task, which NIAH retrieval builds on): "\\0", 0-31
tokens of RULER's noise sentences, s = 48-96 random bytes, 8-47 tokens of noise, s again, noise up to
DRILL tokens; the loss is on the second copy from its second token on. The noise before s matters:
drills with s right after "\\0" taught a head that copies what follows the document start, whatever
it is, and it did not retrieve (LOG.md, stops 15-16). Trained on NIAH alone a model stays on the
loss plateau (LOG.md, stops 13-14): config/star_copy.py trains on the drills first.
"""
import os, random, sys
import numpy as np
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.*`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizer import ByteTokenizer, read_meta, write_dataset
from data import ruler
from data.pycode.prepare import prepare as prepare_pycode

HERE = os.path.dirname(os.path.abspath(__file__))
TASK = "niah_single_1"

DRILL = 256  # tokens per copy drill
NOISE = list((ruler.NOISE + " ").encode())

def noise(rng, n):
    """n tokens of RULER's noise sentences, from a random point in them."""
    start = rng.randrange(len(NOISE))
    return [NOISE[(start + i) % len(NOISE)] for i in range(n)]

def drill(rng):
    """One copy drill document (tokens, loss mask), DRILL tokens: "\\0", noise, s, noise, s, noise."""
    s = [rng.randrange(1, 256) for _ in range(rng.randrange(48, 97))]
    before, gap = noise(rng, rng.randrange(0, 32)), noise(rng, rng.randrange(8, 48))
    tokens = [0] + before + s + gap + s + noise(rng, DRILL)
    mask = [0] * (1 + len(before) + len(s) + len(gap) + 1) + [1] * (len(s) - 1) + [0] * DRILL
    return tokens[:DRILL], mask[:DRILL]

def niah(rng, prefix):
    """One RULER niah_single_1 document (tokens, loss mask): "\\0", the prompt, the answer, a blank line."""
    length, depth = rng.randrange(400, 751, 10), rng.random()
    text, outputs = ruler.niah(TASK, length, ByteTokenizer(), rng, depth, None, prefix)
    prompt, answer = list(text.encode()), list((" " + ", ".join(outputs) + ".\n\n").encode())
    return [0] + prompt + answer, [0] * (1 + len(prompt)) + [1] * len(answer)

def mix(text, n_tokens, frac, seed, drills=0.0, prefix="needle"):
    """About n_tokens byte tokens and their loss mask (uint8 arrays): "\\0"-started documents, RULER
    samples, copy drills and slices of text (uint32 array) in the given fractions of the tokens."""
    rng, out, masks, pos = random.Random(seed), [], [], 0
    size, want = {"niah": 0, "drill": 0, "text": 0}, {"niah": frac, "drill": drills, "text": 1 - frac - drills}
    while sum(size.values()) < n_tokens:
        total = max(sum(size.values()), 1)  # the kind furthest below its share comes next
        kind = max(want, key=lambda k: want[k] - size[k] / total)
        if kind == "drill":
            piece, mask = drill(rng)
        elif kind == "niah":
            piece, mask = niah(rng, prefix)
        else:
            n = rng.randrange(256, 1025)
            piece, pos = [0] + [int(t) for t in text[pos:pos + n]], (pos + n) % max(len(text) - 1024, 1)
            mask = [1] * len(piece)
        out.append(np.asarray(piece, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=np.uint8))
        size[kind] += len(piece)
    return np.concatenate(out), np.concatenate(masks)

def prepare(out_dir=HERE, train_tokens=8_000_000, val_tokens=400_000, frac=0.5, drills=0.45, prefix="needle"):
    """Build a data set folder (train.bin, val.bin, the loss masks, meta.json). Returns the meta dict."""
    pycode = os.path.join(os.path.dirname(HERE), "pycode")
    if frac + drills < 1:
        if not os.path.exists(os.path.join(pycode, "meta.json")):
            prepare_pycode(pycode)
        read_meta(pycode)
        train, val = (np.memmap(os.path.join(pycode, f"{s}.bin"), dtype=np.uint32, mode="r") for s in ("train", "val"))
    else:  # no text in the mix
        train = val = np.zeros(0, dtype=np.uint32)
    meta = {**ByteTokenizer.meta, "eot": 0, "source": "RULER niah + copy drills + pycode, one document each",
            "retrieval_fraction": frac, "drill_fraction": drills, "tasks": [TASK], "answer_prefix": prefix}
    (tx, tm), (vx, vm) = (mix(t, n, frac, seed, drills, prefix)
                          for t, n, seed in ((train, train_tokens, 0), (val, val_tokens, 1)))
    meta = write_dataset(out_dir, tx, vx, meta, masks=(tm, vm))
    print(f"{os.path.basename(out_dir)}: train {meta['train_tokens']:,} tokens | "
          f"val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="RULER needle retrieval mixed with copy drills and pycode")
    ap.add_argument("--frac", type=float, default=0.5, help="fraction of the tokens in retrieval samples")
    ap.add_argument("--drills", type=float, default=0.45, help="fraction of the tokens in copy drills")
    ap.add_argument("--drills_only", action="store_true", help="copy drills alone, into data/copy_drills")
    ap.add_argument("--prefix", default="needle", choices=["needle", "ruler"],
                    help="NIAH answer prefix (data/ruler.py PREFIX); 'ruler' writes data/pycode_niah_ruler")
    args = ap.parse_args()
    if args.drills_only:
        args.frac, args.drills = 0.0, 1.0
    if not (0 <= args.frac <= 1 and 0 <= args.drills <= 1 and args.frac + args.drills <= 1):
        sys.exit(f"error: --frac={args.frac}, --drills={args.drills}: expected fractions summing to at most 1")
    name = "copy_drills" if args.drills_only else \
        "pycode_niah" if (args.frac, args.drills) == (0.5, 0.45) else \
        f"pycode_niah_{round(args.frac * 100)}_{round(args.drills * 100)}"
    name += "_ruler" if args.prefix == "ruler" and not args.drills_only else ""
    prepare(os.path.join(os.path.dirname(HERE), name), frac=args.frac, drills=args.drills, prefix=args.prefix)
