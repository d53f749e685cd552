"""
romanize.py: romanization encoding for Mandarin-English code-switching speech recognition, the output side
of a transducer (asr.py). Read after asr.py's docstring; data/speech/prepare.py writes the corpus it reads.
Paper: "Romanization encoding for script-heavy languages" (FastConformer-RNNT on SEAME): a transducer that
writes Mandarin as tonal pinyin syllables instead of characters has a far smaller output vocabulary
(-63.51% there), and a text-only Roman2Char model turns the syllables back into characters in context.

Sections: 1) pinyin syllables split into initial, final and tone (also the PET embeddings' token features);
2) a small BPE; 3) the balanced concatenated tokenizer (blank, English range, Mandarin range, each range sized
by its share of the training text; 'roman' and the 'char' baseline); 4) Roman2Char and the frequency baseline;
5) the command line:  python3 romanize.py [--data_dir=data/speech --out_dir=out-speech --vocab_size=128 ...]

A sentence is a dict (or an object) with `units`, one per Mandarin character or English word, and `pinyin`,
the tonal syllable of each Mandarin unit and None for English: {"units": ["我", "green"], "pinyin": ["wo3", None]}.
Shape letters: B sentences, T units, d the embedding width, C characters.
"""
import json, os, re, sys, time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# -----------------------------------------------------------------------------
# 1) pinyin: a tonal syllable such as 'zhuang1' is initial 'zh' + final 'uang' + tone 1

INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "r", "z", "c", "s")
# the standard finals, ü written v, in full: the spelling abbreviates iou, uei, uen after an initial (liu, gui, lun)
FINALS = {"a", "o", "e", "i", "u", "v", "ai", "ei", "ao", "ou", "an", "en", "ang", "eng", "ong", "er",
          "ia", "ie", "iao", "iou", "ian", "in", "iang", "ing", "iong",
          "ua", "uo", "uai", "uei", "uan", "uen", "uang", "ueng", "ve", "van", "vn"}


@dataclass(frozen=True)
class Syllable:
    initial: str   # one of INITIALS, or '' (zero initial)
    final: str     # one of FINALS, written in full (the PET embeddings' final feature)
    tone: int      # 1-4, 5 = neutral
    toneless: str  # the written syllable without its tone digit: 'zhuang', 'yi', 'lv'


def split_syllable(s):
    """Syllable of a tonal pinyin syllable ('xiang1', 'lv4', 'er2', 'yi1'); ValueError naming it if malformed.
    y and w are spelling, not initials: a syllable written with them has the zero initial and its full final
    (yi -> i, ya -> ia, you -> iou, yu -> v, yuan -> van, wu -> u, wei -> uei); j, q, x write ü as u (ju -> jv).
    Only the parts are checked, not whether Mandarin has that initial-final pair; the interjections m, n, ng are
    not syllables here."""
    m = re.fullmatch(r"([a-z]+)([1-5])", s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"malformed pinyin syllable {s!r}: expected letters a-z (ü as v) and a tone digit 1-5")
    toneless, tone = m[1], int(m[2])
    initial = next((i for i in INITIALS if toneless.startswith(i)), "")
    rest = toneless[len(initial):]
    if initial in ("j", "q", "x") and rest.startswith("u"):  # ju is jü
        rest = "v" + rest[1:]
    if initial:
        final = {"iu": "iou", "ui": "uei", "un": "uen"}.get(rest, rest)  # liu, gui, lun abbreviate
    elif rest.startswith("yu"):
        final = "v" + rest[2:]  # yu yue yuan yun: ü üe üan ün
    elif rest.startswith("yi") or rest == "wu":
        final = rest[1:]  # yi yin ying: i in ing; wu: u
    elif rest[0] in "yw" and len(rest) > 1:
        final = ("i" if rest[0] == "y" else "u") + rest[1:]  # ya you yong: ia iou iong; wo wei: uo uei
    else:
        final = rest if rest[0] in "aoe" else ""  # a bare i, u or v is always spelled yi, wu, yu
    if final not in FINALS or (final == "er" and initial):
        raise ValueError(f"malformed pinyin syllable {s!r}: {toneless!r} is not an initial and a final")
    return Syllable(initial, final, tone, toneless)


def is_syllable(s):
    try:
        split_syllable(s)
        return True
    except ValueError:
        return False


def romanize(units, pinyin):
    """The romanized sentence: each Mandarin unit replaced by its tonal syllable, English words as they are."""
    return [u if p is None else p for u, p in zip(units, pinyin)]


def unpack(sentence):
    return (sentence["units"], sentence["pinyin"]) if isinstance(sentence, dict) else (sentence.units, sentence.pinyin)


# -----------------------------------------------------------------------------
# 2) BPE: the base symbols are the characters and a word-start marker before each word ('green' -> ▁ g r e e n, as
# in SentencePiece), so a piece that starts with the marker starts a word and a word's pieces join back into it
# exactly. One marker symbol, not a marked copy of each letter: data/speech's English alphabet is 26 symbols, not
# 47, which its English range at --vocab_size=128 (30 pieces) needs.

WORD_START = "\u2581"


def _symbols(word):
    return [WORD_START, *word]


def _merge(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


@dataclass
class BPE:
    pieces: list   # the vocabulary: the base symbols (sorted), then each new merged piece in the order learnt
    merges: list   # (left, right) pairs, in the order learnt; encoding applies them in that order

    def __post_init__(self):
        self.merges = [tuple(m) for m in self.merges]
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, word):
        unknown = [s for s in (_symbols(word) if word else []) if s not in self.index]
        if not word or WORD_START in word or unknown:
            raise ValueError(f"cannot encode {word!r}: {unknown or 'empty, or holds the word-start marker'} "
                             f"not in the BPE alphabet")
        symbols = _symbols(word)
        for pair in self.merges:  # the order of training, so a training word comes out as training left it
            symbols = _merge(symbols, pair)
        return symbols


def train_bpe(counts, n_pieces):
    """A BPE of at most n_pieces pieces over a Counter of words: the base symbols, then merges of the most
    frequent adjacent pair (ties: the smallest pair in string order) until n_pieces, or no pair is left.
    ValueError if the base symbols alone are more than n_pieces."""
    words = {w: _symbols(w) for w in counts}
    pieces = sorted({s for symbols in words.values() for s in symbols})
    if len(pieces) > n_pieces:
        raise ValueError(f"its alphabet alone has {len(pieces)} symbols, more than {n_pieces} pieces")
    merges, have = [], set(pieces)
    while len(pieces) < n_pieces:
        pairs = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        if best[0] + best[1] not in have:  # two merge orders can spell one piece ('▁a'+'bc', '▁ab'+'c'): one id
            pieces.append(best[0] + best[1])
            have.add(best[0] + best[1])
        words = {w: _merge(symbols, best) for w, symbols in words.items()}
    return BPE(pieces, merges)


# -----------------------------------------------------------------------------
# 3) the balanced concatenated tokenizer: ids [0] blank | [en_start, zh_start) English | [zh_start, vocab_size)
# Mandarin. In 'char' mode the Mandarin range is the characters themselves, each piece a whole unit (a BPE with no
# merges and no marker).

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def is_mandarin(unit):
    """A unit is Mandarin if it holds a CJK character or is a well-formed tonal syllable; anything else (a
    malformed syllable from a recogniser included) counts as English."""
    return bool(CJK.search(unit)) or is_syllable(unit)


@dataclass
class ConcatTokenizer:
    mode: str   # 'roman' (Mandarin as tonal syllables) or 'char' (Mandarin as characters: the baseline)
    en: BPE     # the English range's pieces
    zh: BPE     # the Mandarin range's pieces: syllables' BPE ('roman'), or the characters and no merges ('char')

    def __post_init__(self):
        assert self.mode in ("roman", "char"), self.mode
        self.en_start = 1  # id 0 is the transducer's blank
        self.zh_start = self.en_start + len(self.en.pieces)
        self.vocab_size = self.zh_start + len(self.zh.pieces)  # ids, blank included

    is_mandarin = staticmethod(is_mandarin)

    def encode(self, units, pinyin, unknown=None):
        """Ids of a sentence (no blank); a character that the ranges cannot spell is the id unknown where one
        is given, and a ValueError otherwise."""
        ids = []
        for unit, syllable in zip(units, pinyin):
            if syllable is None:
                ids += [self.en_start + self.en.index[p] for p in self.en.encode(unit)]
            elif self.mode == "roman":
                ids += [self.zh_start + self.zh.index[p] for p in self.zh.encode(syllable)]
            elif unit in self.zh.index:
                ids.append(self.zh_start + self.zh.index[unit])
            elif unknown is not None:
                ids.append(unknown)
            else:
                raise ValueError(f"character {unit!r} is not in the Mandarin range")
        return ids

    def decode(self, ids):
        """The units of any id sequence (a recogniser's output may be malformed). Blanks and ids outside the
        vocabulary are dropped; a piece with the word-start marker starts a unit, as does every character in
        'char' mode; a continuation piece extends the unit before it if that unit came from the same range, and
        otherwise (first, or after the other language) starts a unit of its own; a marker alone spells nothing."""
        units, langs = [], []
        for i in ids:
            if self.en_start <= i < self.zh_start:
                lang, piece = "en", self.en.pieces[i - self.en_start]
            elif self.zh_start <= i < self.vocab_size:
                lang, piece = "zh", self.zh.pieces[i - self.zh_start]
            else:
                continue
            if piece.startswith(WORD_START) or (lang, self.mode) == ("zh", "char") or not units or langs[-1] != lang:
                units.append(piece.removeprefix(WORD_START))
                langs.append(lang)
            else:
                units[-1] += piece
        return [u for u in units if u]

    def to_dict(self):
        return {"mode": self.mode, "en": {"pieces": self.en.pieces, "merges": [list(m) for m in self.en.merges]},
                "zh": {"pieces": self.zh.pieces, "merges": [list(m) for m in self.zh.merges]}}

    @classmethod
    def from_dict(cls, d):
        return cls(d["mode"], BPE(**d["en"]), BPE(**d["zh"]))


def build_tokenizer(sentences, mode, vocab_size):
    """The balanced concatenated tokenizer of a training text. p = the Mandarin share of its units; the
    Mandarin range gets k_zh = round(p * vocab_size) pieces and the English range k_en = vocab_size - k_zh
    (the blank is one id more). mode 'roman': BPE over the tonal syllables; 'char': every distinct character
    (k_zh unused). A range may come out smaller when every word is already one piece. ValueError when a
    range cannot hold its alphabet."""
    if mode not in ("roman", "char"):
        raise ValueError(f"mode must be 'roman' or 'char', not {mode!r}")
    en, zh, chars = Counter(), Counter(), Counter()
    for units, pinyin in map(unpack, sentences):
        en.update(u for u, s in zip(units, pinyin) if s is None)
        zh.update(s for s in pinyin if s is not None)
        chars.update(u for u, s in zip(units, pinyin) if s is not None)
    p = sum(zh.values()) / max(1, sum(zh.values()) + sum(en.values()))
    k_zh = round(p * vocab_size)
    k_en = vocab_size - k_zh
    en_bpe = _range_bpe("English", en, k_en, vocab_size)
    zh_bpe = _range_bpe("Mandarin", zh, k_zh, vocab_size) if mode == "roman" else BPE(sorted(chars), [])
    return ConcatTokenizer(mode, en_bpe, zh_bpe)


def _range_bpe(name, counts, k, vocab_size):
    try:
        return train_bpe(counts, k)
    except ValueError as e:
        raise ValueError(f"vocab_size={vocab_size} is too small: the {name} range gets {k} pieces, but {e}") from None


def vocabulary_reduction(char_tok, roman_tok):
    """The fraction of the output vocabulary (blank included) that romanization removes: the paper's -63.51%."""
    return 1 - roman_tok.vocab_size / char_tok.vocab_size


# -----------------------------------------------------------------------------
# 4) Roman2Char: characters from a romanized sentence, in context. Each syllable's candidates are the characters
# the training text (and the lexicon, if given) reads with it, most frequent first (ties: the character's
# frequency over the whole text, then its code point). The classifier picks among them. A syllable the text never
# shows but the lexicon does gets its first candidate (the character most frequent overall); a syllable without
# candidates (unknown, or malformed recogniser output) is left as it is.

PAD, UNK = 0, 1


def count_readings(sentences):
    """Counters of (syllable, character) pairs and of characters over the Mandarin units of sentences."""
    readings = Counter((s, u) for units, pinyin in map(unpack, sentences) for u, s in zip(units, pinyin) if s)
    chars = Counter()
    for (_, c), n in readings.items():
        chars[c] += n
    return readings, chars


def candidate_table(sentences, lexicon=()):
    """{syllable: candidate characters, most frequent first} from the text and lexicon entries (.lang, .word,
    .pinyin: one syllable per character of a Mandarin word)."""
    readings, chars = count_readings(sentences)
    pairs = set(readings) | {(s, c) for e in lexicon if e.lang == "zh" for c, s in zip(e.word, e.pinyin)}
    table = {}
    for s, c in sorted(pairs, key=lambda sc: (-readings[sc], -chars[sc[1]], sc[1])):
        table.setdefault(s, []).append(c)
    return table


def frequency_baseline(sentences):
    """The function mapping a syllable to its most frequent character in sentences (an unknown one to itself)."""
    first = {s: cs[0] for s, cs in candidate_table(sentences).items()}
    return lambda syllable: first.get(syllable, syllable)


class Roman2Char(nn.Module):
    def __init__(self, units, chars, candidates, d_model=64):
        super().__init__()
        self.units, self.chars, self.candidates, self.d_model = list(units), list(chars), candidates, d_model
        self.unit_index = {u: i for i, u in enumerate(self.units)}  # units[PAD] = '<pad>', units[UNK] = '<unk>'
        char_index = {c: i for i, c in enumerate(self.chars)}
        self.embed = nn.Embedding(len(self.units), d_model, padding_idx=PAD)
        self.encoder = nn.GRU(d_model, d_model, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * d_model, len(self.chars))
        allowed = torch.zeros(len(self.units), len(self.chars), dtype=torch.bool)  # the candidate mask per unit
        for s, cs in candidates.items():
            if s in self.unit_index:
                allowed[self.unit_index[s], [char_index[c] for c in cs]] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, x, lengths):
        """Character logits (B, T, C) of unit ids x (B, T) with lengths (B,); -inf off each unit's candidates
        (every entry, at English, padding and unknown positions)."""
        h = self.embed(x)  # (B, T, d)
        h, _ = self.encoder(pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False))
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])  # (B, T, 2d)
        return self.head(h).masked_fill(~self.allowed[x], float("-inf"))  # (B, T, C)

    def ids(self, batch):
        """Padded unit ids (B, T) and lengths (B,) of romanized sentences."""
        T = max([1, *map(len, batch)])
        x = torch.full((len(batch), T), PAD, dtype=torch.long)
        for b, units in enumerate(batch):
            x[b, :len(units)] = torch.tensor([self.unit_index.get(u, UNK) for u in units], dtype=torch.long)
        return x, torch.tensor([max(1, len(units)) for units in batch])


def train_roman2char(sentences, steps=400, batch_size=64, lr=3e-3, seed=1337, lexicon=()):
    """A Roman2Char trained on text alone: each sentence romanized by its own pinyin is the input, its
    characters the targets (cross-entropy at the Mandarin positions, over the candidates)."""
    torch.manual_seed(seed)
    pairs = [(romanize(*unpack(s)), unpack(s)) for s in sentences]
    units = ["<pad>", "<unk>"] + sorted({u for roman, _ in pairs for u in roman})
    candidates = candidate_table(sentences, lexicon)
    chars = sorted({c for cs in candidates.values() for c in cs})
    model = Roman2Char(units, chars, candidates)
    char_index = {c: i for i, c in enumerate(chars)}
    x, lengths = model.ids([roman for roman, _ in pairs])  # (N, T), (N,)
    y = torch.full_like(x, -1)  # (N, T) target character ids, -1 at English and padding
    for n, (_, (u, p)) in enumerate(pairs):
        y[n, :len(u)] = torch.tensor([-1 if s is None else char_index[c] for c, s in zip(u, p)], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # linear decay to 0
            group["lr"] = lr * (1 - step / steps)
        rows = torch.randint(len(pairs), (batch_size,), generator=g)
        T = int(lengths[rows].max())
        target = y[rows, :T]  # (B, T)
        at = target >= 0
        if not at.any():  # English alone: nothing to learn (and the logits there are all -inf)
            continue
        loss = F.cross_entropy(model(x[rows, :T], lengths[rows])[at], target[at])  # logits (B, T, C) at Mandarin
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def to_chars_batch(model, batch):
    """The units of romanized sentences with each Mandarin syllable turned into a character (the rule above
    section 4); English words pass through."""
    if not batch:
        return []
    x, lengths = model.ids(batch)
    best = model(x, lengths).argmax(-1)  # (B, T)
    pick = lambda b, t, u: model.chars[best[b, t]] if x[b, t] != UNK else model.candidates[u][0]
    return [[pick(b, t, u) if u in model.candidates else u for t, u in enumerate(units)]  # English, no candidate: as is
            for b, units in enumerate(batch)]


def to_chars(model, units):
    return to_chars_batch(model, [units])[0]


def state(model):
    """A Roman2Char as a plain dict (vocabularies as lists and dicts, and the state_dict): weights_only-loadable,
    for its own file (save) or inside another checkpoint (train_asr.py's)."""
    return {"units": model.units, "chars": model.chars, "candidates": model.candidates, "d_model": model.d_model,
            "model": model.state_dict()}


def from_state(d):
    model = Roman2Char(d["units"], d["chars"], d["candidates"], d["d_model"])
    model.load_state_dict(d["model"])
    return model.eval()


def save(model, path):
    torch.save(state(model), path)


def load(path):
    return from_state(torch.load(path, map_location="cpu", weights_only=True))


@dataclass
class Accuracy:
    n: int = 0                  # Mandarin positions
    correct: int = 0
    n_homophone: int = 0        # Mandarin positions whose syllable has more than one candidate
    correct_homophone: int = 0

    def percent(self, homophones=False):
        right, n = (self.correct_homophone, self.n_homophone) if homophones else (self.correct, self.n)
        return 100 * right / max(1, n)


def char_accuracy(predicted, sentences, candidates):
    """Accuracy of predicted unit lists against the sentences' characters, at their Mandarin positions."""
    acc = Accuracy()
    for pred, (units, pinyin) in zip(predicted, map(unpack, sentences)):
        for p, u, s in zip(pred, units, pinyin):
            if s is not None:
                homophone = len(candidates.get(s, ())) > 1
                acc.n, acc.correct = acc.n + 1, acc.correct + (p == u)
                acc.n_homophone += homophone
                acc.correct_homophone += homophone and p == u
    return acc


# -----------------------------------------------------------------------------
# 5) the command line: tokenizer sizes from train.jsonl, Roman2Char trained on text.jsonl, scored on val and test

FLAGS = dict(
    data_dir="data/speech",   # prepare.py's folder: {train,val,test,text}.jsonl
    out_dir="out-speech",     # writes roman2char.pt here
    vocab_size=128,           # tokenizer pieces over both ranges (the blank is one id more)
    steps=400,                # Roman2Char optimizer steps
    batch_size=64,            # sentences per step
    lr=3e-3,                  # AdamW peak learning rate, decayed linearly to 0
    seed=1337,                # torch seed of the weights and the batches
    threads=1,                # torch CPU threads: one is as fast here, and 2 threads on a busy 2-core machine
                              # spin-wait on each other (400 steps: 8 s alone, up to 2 minutes beside a job)
)
RANGES = {"vocab_size": "int [2, inf)", "steps": "int [1, inf)", "batch_size": "int [1, inf)", "lr": "(0, inf)",
          "threads": "int [1, inf)"}


def parse_flags(argv):
    """The flags as a dict, and configurator.py's die(); exec'd, not imported, so that this file imports none of
    ours and asr.py can import it."""
    scope = dict(FLAGS, config_keys=list(FLAGS), config_ranges=RANGES)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read(), scope)
    finally:
        sys.argv = saved
    return {k: scope[k] for k in FLAGS}, scope["die"]


def main(argv):
    start = time.time()
    cfg, die = parse_flags(argv)
    d = cfg["data_dir"]
    paths = {split: os.path.join(d, f"{split}.jsonl") for split in ("train", "val", "test", "text")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        die(f"{missing[0]} not found: run python3 data/speech/prepare.py first")
    torch.set_num_threads(cfg["threads"])
    data = {split: [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
            for split, path in paths.items()}

    # 1) the two tokenizers of the transducer's training transcripts
    try:
        char_tok, roman_tok = (build_tokenizer(data["train"], mode, cfg["vocab_size"]) for mode in ("char", "roman"))
    except ValueError as e:
        die(str(e))
    print(f"tokenizers of {len(data['train']):,} training transcripts, --vocab_size={cfg['vocab_size']}:")
    for name, tok in (("char", char_tok), ("roman", roman_tok)):
        print(f"  {name:5s}: 1 blank + {tok.zh_start - tok.en_start} English + {tok.vocab_size - tok.zh_start} "
              f"Mandarin = {tok.vocab_size} ids")
    print(f"  output vocabulary {-100 * vocabulary_reduction(char_tok, roman_tok):+.2f}% (paper, SEAME: -63.51%)")

    # 2) Roman2Char on text alone; its candidates are the text's (text.jsonl reads every lexicon character with
    # every syllable the lexicon gives it, so prepare.read_lexicon would add none)
    t0 = time.time()
    model = train_roman2char(data["text"], cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["seed"])
    print(f"roman2char: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg['steps']} steps on "
          f"{len(data['text']):,} text sentences in {time.time() - t0:.1f} s\n  {len(model.chars)} characters, "
          f"{len(model.candidates)} syllables, {sum(len(c) > 1 for c in model.candidates.values())} of them with "
          f"homophones")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    save(model, os.path.join(cfg["out_dir"], "roman2char.pt"))
    print(f"  saved {os.path.join(cfg['out_dir'], 'roman2char.pt')}")

    # 3) character accuracy at the Mandarin positions of val and test, the sentences romanized by their pinyin
    baseline, rows = frequency_baseline(data["text"]), {"roman2char": [], "frequency": []}
    for split in ("val", "test"):
        roman = [romanize(*unpack(s)) for s in data[split]]
        rows["roman2char"].append(char_accuracy(to_chars_batch(model, roman), data[split], model.candidates))
        guess = [[baseline(u) for u in r] for r in roman]
        rows["frequency"].append(char_accuracy(guess, data[split], model.candidates))
    print("character accuracy at Mandarin positions (all | homophone syllables only):")
    print((" " * 14 + "".join(f"{split} ({a.n:,} | {a.n_homophone:,})".ljust(24)
                              for split, a in zip(("val", "test"), rows["frequency"]))).rstrip())
    for name, accs in rows.items():
        cells = [f"{a.percent():5.1f}% | {a.percent(True):5.1f}%" for a in accs]
        print(f"  {name:12s}" + "".join(c.ljust(24) for c in cells).rstrip())
    print(f"total {time.time() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
