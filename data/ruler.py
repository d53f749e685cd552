"""
data/ruler.py: RULER's synthetic long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?", arXiv:2404.06654), generated at any length in tokens of
any of our tokenizers, and RULER's string-match score. eval.py runs them; data/pycode_niah/prepare.py
mixes them into training data.

Tasks (RULER's names; the QA tasks need external data sets and are left out):
  niah_single_1      noise haystack,  word key, number value
  niah_single_2      essay haystack,  word key, number value
  niah_single_3      essay haystack,  word key, UUID value
  niah_multikey_1    essay haystack,  the key among 3 distractor needles (other keys)
  niah_multikey_2    needle haystack: the whole context is distractor needles; number value
  niah_multikey_3    needle haystack, UUID keys and values
  niah_multivalue    essay haystack,  one key with 4 values, all must be found
  niah_multiquery    essay haystack,  4 keys queried at once
  vt                 variable tracking: a chain of 4 assignments VAR B = VAR A ... in noise
  cwe                common words extraction: the 10 words repeated 30 times among words seen 3 times
  fwe                frequent words extraction: the 3 most frequent coded words of a Zipf(2) draw

Every needle is the sentence "One of the special magic {type} for {key} is: {value}." and the needles of a
sample sit at depths spread over its context (single needle: sample i of n at depth (i + 1/2) / n, so a
length's samples sweep the whole context). Haystacks: noise (RULER's repeated five sentences), essay
(consecutive words of any local text file, e.g. ../shared/data/tinyshakespeare.txt) or needles.

A sample is {"task", "input", "query", "outputs", "answer", "length", "max_new_tokens"}: "input" is the
prompt, ending with the answer prefix, and fills `length` tokens of the tokenizer as closely as whole
haystack units allow (never more); "query" is its last line, the question and answer prefix after the
context (Star Attention's query); "outputs" are the strings to find; "answer" is the ideal continuation
(what a training mix appends). Scoring is RULER's string_match_all: the fraction of a sample's outputs found in
the prediction (case-insensitive), averaged over samples, times 100.

Deviations from RULER: keys and the words of cwe are made-up pronounceable words drawn from a fixed
syllable table (RULER draws English words from the wonderwords package: no extra dependency here), and
templates are RULER's wording with the answer prefix always closing the prompt.

    python data/ruler.py --task=niah_single_1 --length=512       # print one sample (byte tokens)
"""
import argparse, os, random, sys, uuid
import numpy as np
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.tokenizer`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.tokenizer import ByteTokenizer, DataError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
# answer prefixes: RULER's, and (prefix="needle", ours) the needle's own words, which turns retrieval
# into an induction lookup (copy what followed the same words before) that small models learn
PREFIX = {"ruler": "The special magic {type} for {query} mentioned in the provided text are",
          "needle": "One of the special magic {type} for {query} is:"}
NIAH = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type} afterwards.\n{context}\n"
        "What are all the special magic {type} for {query} mentioned in the provided text? {prefix}")
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
      "Question: Find all variables that are assigned the value {value} in the text above. "
      "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
      "assigned the value {value}, they are:")
CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
       "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
       "above list? Answer: The top 10 words that appear most often in the list are:")
FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
       "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
       "the dots '....'. What are the three most frequently appeared words in the above coded text? "
       "Answer: According to the coded text above, the three most frequently appeared words are:")

# task: (haystack, key kind, value kind, needles in the context, values per key, keys queried)
NIAH_TASKS = {
    "niah_single_1": ("noise", "word", "number", 1, 1, 1),
    "niah_single_2": ("essay", "word", "number", 1, 1, 1),
    "niah_single_3": ("essay", "word", "uuid", 1, 1, 1),
    "niah_multikey_1": ("essay", "word", "number", 4, 1, 1),
    "niah_multikey_2": ("needle", "word", "number", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuid", "uuid", 1, 1, 1),
    "niah_multivalue": ("essay", "word", "number", 1, 4, 1),
    "niah_multiquery": ("essay", "word", "number", 4, 1, 4),
}
TASKS = list(NIAH_TASKS) + ["vt", "cwe", "fwe"]
MAX_NEW_TOKENS = {"vt": 30, "cwe": 120, "fwe": 50}  # RULER's generation budgets; NIAH: 128

# -----------------------------------------------------------------------------
# random keys and values

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables

def word(rng):
    """A made-up two-part key such as 'kotamu-risel' (RULER: an adjective-noun pair)."""
    part = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    return part() + "-" + part()

def value(kind, rng):
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))  # seven digits, as RULER
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return word(rng)

def key(kind, rng):
    return value(kind, rng) if kind == "uuid" else word(rng)

# -----------------------------------------------------------------------------
# fitting a prompt into `length` tokens

class TooShort(DataError):
    """The task's prompt does not fit in the asked length even with an empty haystack."""

def fit(build, n_max, tokenizer, length):
    """The largest n in [0, n_max] whose prompt build(n) is at most `length` tokens (binary search: the
    token count grows with n), and that prompt. DataError when even n = 0 does not fit."""
    count = lambda n: len(tokenizer.encode(build(n)))
    if count(0) > length:
        raise TooShort(f"length {length} is too short: the prompt without any haystack is {count(0)} tokens")
    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid - 1)
    return build(lo)

def insert(units, needles, depths):
    """units with each needle placed at its depth (a fraction of the way through)."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: -p[1]):  # deepest first keeps indices
        out.insert(round(depth * len(units)), needle)
    return out

def essay_words(essay):
    if essay is None:
        raise DataError("this task's haystack is an essay: pass essay=PATH (any local text file, e.g. "
                        "../shared/data/tinyshakespeare.txt)")
    try:
        with open(essay, encoding="utf-8", errors="replace") as f:
            words = f.read().split()
    except OSError as e:
        raise DataError(f"cannot read the essay file {essay}: {e}") from None
    if len(words) < 100:
        raise DataError(f"the essay file {essay} has only {len(words)} words")
    return words

# -----------------------------------------------------------------------------
# the tasks


def niah(task, length, tokenizer, rng, depth, essay, prefix="ruler"):
    haystack, key_kind, value_kind, n_needles, n_values, n_queries = NIAH_TASKS[task]
    if prefix == "needle" and (n_values > 1 or n_queries > 1):
        raise DataError(f"{task}: the answer prefix 'needle' is for tasks with one key and one value")
    kind = {"number": "numbers", "uuid": "uuids", "word": "words"}[value_kind]
    keys = []
    while len(keys) < n_needles:  # distinct keys: the first n_queries are asked for
        k = key(key_kind, rng)
        keys += [k] if k not in keys else []
    values = [[value(value_kind, rng) for _ in range(n_values)] for _ in keys]
    needles = [NEEDLE.format(type=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    depths = [depth] if len(needles) == 1 else sorted(rng.random() for _ in needles)
    query = keys[:n_queries]
    query_text = query[0] if n_queries == 1 else ", ".join(query[:-1]) + ", and " + query[-1]
    n_max = length  # haystack units never need to outnumber the tokens
    if haystack == "essay":
        words = essay_words(essay)
        start = rng.randrange(len(words))
        units = lambda n: [words[(start + i) % len(words)] for i in range(n)]
    elif haystack == "noise":
        units = lambda n: [NOISE] * n
    else:  # distractor needles, each with its own key and value
        pool = [NEEDLE.format(type=kind, key=key(key_kind, rng), value=value(value_kind, rng))
                for _ in range(length // 8 + 1)]
        units = lambda n: pool[:n]
        n_max = len(pool)
    answer_prefix = PREFIX[prefix].format(type=kind, query=query_text)
    build = lambda n: NIAH.format(type=kind, query=query_text, prefix=answer_prefix,
                                  context=" ".join(insert(units(n), needles, depths)))
    outputs = [v for vs in values[:n_queries] for v in vs]
    return fit(build, n_max, tokenizer, length), outputs


def vt(length, tokenizer, rng, depth, essay, hops=4):
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        names += [name] if name not in names else []
    v = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)  # in order: each assignment after the one it reads
    build = lambda n: VT.format(context=" ".join(insert([NOISE] * n, chain, depths)), value=v, n=len(names))
    return fit(build, length, tokenizer, length), names


def cwe(length, tokenizer, rng, depth, essay, n_common=10, freq_rare=3):
    vocab = list(dict.fromkeys(word(rng).split("-")[0] for _ in range(4 * length)))  # distinct, in draw order
    common, rare = vocab[:n_common], vocab[n_common:]
    def build(n, freq_common):  # n rare words, 3 times each, shuffled with the common ones
        words = common * freq_common + rare[:n] * freq_rare
        random.Random(n).shuffle(words)
        return CWE.format(context=" ".join(f"{i + 1}. {w}" for i, w in enumerate(words)))
    # RULER's 30 repeats of each common word, fewer when they alone would fill half the context
    freq = next((f for f in (30, 20, 10, 6) if len(tokenizer.encode(build(0, f))) <= length // 2), 6)
    return fit(lambda n: build(n, freq), len(rare), tokenizer, length), common


def fwe(length, tokenizer, rng, depth, essay, alpha=2.0):
    vocab = list(dict.fromkeys("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
                                for _ in range(1000)))
    ranks = np.random.default_rng(rng.getrandbits(32)).zipf(alpha, 4 * length)  # word ranks, P(r) ~ r^-alpha
    ranks = [int(r) for r in ranks if r <= len(vocab)]
    def build(n):
        return FWE.format(context=" .... ".join(vocab[r - 1] for r in ranks[:n]))
    text = fit(build, len(ranks), tokenizer, length)
    n = text.count(" .... ") + 1
    counts = {}
    for r in ranks[:n]:
        counts[r] = counts.get(r, 0) + 1
    top = sorted(counts, key=lambda r: (-counts[r], r))[:3]
    return text, [vocab[r - 1] for r in top]


def generate(task, length, tokenizer=None, n=10, seed=0, essay=None, prefix="ruler"):
    """n samples of a RULER task whose prompts fill `length` tokens of `tokenizer` (default: bytes).
    Deterministic in (task, length, n, seed, tokenizer, essay, prefix). prefix: the NIAH answer
    prefix, "ruler" or "needle" (see PREFIX)."""
    if task not in TASKS:
        raise DataError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    if prefix not in PREFIX:
        raise DataError(f"unknown answer prefix {prefix!r}; choose from {', '.join(PREFIX)}")
    tokenizer = tokenizer or ByteTokenizer()
    samples = []
    for i in range(n):
        rng = random.Random(f"{task}/{length}/{seed}/{i}")
        depth = (i + 0.5) / n
        if task in NIAH_TASKS:
            text, outputs = niah(task, length, tokenizer, rng, depth, essay, prefix)
        else:
            text, outputs = {"vt": vt, "cwe": cwe, "fwe": fwe}[task](length, tokenizer, rng, depth, essay)
        samples.append({"task": task, "input": text, "query": text[text.rindex("\n"):], "outputs": outputs,
                        "answer": " " + ", ".join(outputs) + ".",
                        "length": len(tokenizer.encode(text)), "max_new_tokens": MAX_NEW_TOKENS.get(task, 128)})
    return samples


def score(predictions, outputs):
    """RULER's string_match_all: the mean over samples of the fraction of a sample's outputs that occur
    in its prediction (case-insensitive), times 100."""
    assert len(predictions) == len(outputs), "one prediction per sample"
    per = [sum(o.lower() in p.lower() for o in outs) / len(outs) for p, outs in zip(predictions, outputs)]
    return 100.0 * sum(per) / max(len(per), 1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print RULER samples")
    ap.add_argument("--task", default="niah_single_1", choices=TASKS)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--essay", default=None)
    args = ap.parse_args()
    try:
        for s in generate(args.task, args.length, n=args.n, essay=args.essay):
            print(s["input"] + s["answer"], f"\n-- {s['length']} tokens, outputs {s['outputs']}\n")
    except DataError as e:
        sys.exit(f"error: {e}")
