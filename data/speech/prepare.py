"""
data/speech/prepare.py: a synthetic Mandarin-English code-switching speech corpus, made offline by espeak-ng
from a template grammar over a hand-written lexicon. Read data/speech/lexicon.tsv first.
Run: python data/speech/prepare.py            (about 2 minutes on 2 cores; needs espeak-ng)
     python data/speech/prepare.py --n_train=400 --n_text=2000 --out_dir=data/speech_small
     python data/speech/prepare.py --lexicon=data/speech/lexicon.tsv,data/speech/lexicon_longtail.tsv --zipf=1.2 \
         --out_dir=data/speech_longtail    (the long-tail corpus: more words per slot, drawn by a Zipf law)

Sentences: ZH_TEMPLATES, a Mandarin frame whose slots are filled in English with probability P_EN ("我 明天 去
bank 还 书"), or EN_TEMPLATES, an English frame whose slots are filled in Mandarin with probability P_ZH ("i left my 钥匙 at
office"). A unit is one Mandarin character or one English word; each Mandarin unit carries the tonal pinyin of
the word it came from, so the word resolves a polyphone (银行 hang2, 旅行 xing2) and a model that hears 他/她/它
(all ta1) must tell them apart from context. A slot's words are drawn uniformly, or with --zipf=s > 0 the k-th
word of the slot (in lexicon order, counted per language) with weight 1 / k^s: the words that come last are rare.
Speech: one SSML document per utterance; every Mandarin run is read from its pinyin by the cmn-latn-pinyin voice,
every English run by en-us, each run in a <voice> element of its own (a closing </voice> does not restore the
voice before it). espeak-ng's 22050 Hz is resampled to 16 kHz by the FFT, silence trimmed to 50 ms each side.
Speakers: an espeak variant at a speed (words per minute) and a pitch; HELDOUT_VARIANTS are never in training.

Splits. A sentence is held out when crc32(text) % 100 < HELDOUT_PERCENT, whatever the seed or the flags, so
no held-out sentence is ever in train or text, and it stays held out when the corpus is made again bigger.
  train    --n_train training sentences, each read by a random training speaker
  val      --n_val held-out sentences, training speakers
  test     --n_test other held-out sentences, held-out speakers (voices never heard in training)
  text     --n_text training sentences, no audio (to train a text model; train's sentences are its first ones)
Files in --out_dir: {train,val,test}.npz (audio: int16 at 16 kHz, all utterances end to end; offsets: int64,
n + 1, utterance i is audio[offsets[i]:offsets[i + 1]]), {train,val,test}.jsonl (one line per utterance, in
the same order: {"units": [...], "pinyin": [... or null], "speaker": "f2-s170-p60"}), text.jsonl (units and
pinyin), and meta.json, written last: a folder whose meta.json exists is complete.
"""
import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import wave
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import Pool
from xml.sax.saxutils import escape

import numpy as np
from tqdm import tqdm

LEXICON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon.tsv")
SAMPLE_RATE = 16000
SILENCE = 328          # |sample| above this (1% of full scale) is speech; trimming keeps PAD of quiet around it
PAD = SAMPLE_RATE // 20  # 50 ms
HELDOUT_PERCENT = 10   # share of the sentences set aside for val and test
P_EN = 0.35            # a slot of a Mandarin frame is filled in English
P_ZH = 0.6             # a slot of an English frame is filled in Mandarin: those frames are there for the switch
MIN_UNITS, MAX_UNITS = 4, 14

# ----------------------------------------------------------------------------
# the lexicon

HEADER = ["lang", "word", "pinyin", "slot"]
SYLLABLE = re.compile(r"[a-z]+[1-5]")  # tone 5 is the neutral tone, ü is written v


@dataclass(frozen=True)
class Entry:
    lang: str                 # "zh" or "en"
    word: str                 # 1-3 Chinese characters, or one lowercase English word
    pinyin: tuple[str, ...]   # one tonal syllable per character, () for English
    slot: str                 # the grammar slot it fills; "frame" for the templates' fixed words


def parse_entry(line, where):
    fields = line.split("\t")
    if len(fields) != 4:
        raise ValueError(f"{where}: {len(fields)} tab-separated fields, expected 4 (lang word pinyin slot): {line!r}")
    lang, word, pinyin, slot = fields
    syllables = tuple(pinyin.split())
    if not re.fullmatch(r"[a-z_]+", slot):
        raise ValueError(f"{where}: slot {slot!r} is not a lowercase name: {line!r}")
    if lang == "zh":
        if not re.fullmatch(r"[\u4e00-\u9fff]{1,3}", word):
            raise ValueError(f"{where}: a zh word is 1-3 Chinese characters, not {word!r}: {line!r}")
        bad = [s for s in syllables if not SYLLABLE.fullmatch(s)]
        if bad:
            raise ValueError(f"{where}: syllable {bad[0]!r} is not letters and a tone digit 1-5: {line!r}")
        if len(syllables) != len(word):
            raise ValueError(f"{where}: {len(word)} characters but {len(syllables)} syllables: {line!r}")
    elif lang == "en":
        if not re.fullmatch(r"[a-z]+", word) or syllables:
            raise ValueError(f"{where}: an en word is one lowercase English word with empty pinyin: {line!r}")
    else:
        raise ValueError(f"{where}: unknown lang {lang!r}, expected zh or en: {line!r}")
    return Entry(lang, word, syllables, slot)


def read_lexicon(path=LEXICON):
    """The entries of a lexicon file (lexicon.tsv's format), or of several in order (comma-separated paths);
    ValueError names the first malformed line, or a line that repeats one before it in any of the files."""
    entries, seen = [], {}
    for one in path.split(","):
        entries += read_lexicon_file(one, seen)
    return entries


def read_lexicon_file(path, seen):
    entries, header = [], False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            if not header:
                if line.split("\t") != HEADER:
                    raise ValueError(f"{path}, line {lineno}: expected the header {HEADER} (tabs), got {line!r}")
                header = True
                continue
            entry = parse_entry(line, f"{path}, line {lineno}")
            if entry in seen:
                where, before = seen[entry]
                raise ValueError(f"{path}, line {lineno}: repeats line {before}"
                                 + ("" if where == path else f" of {where}") + f": {line!r}")
            seen[entry] = (path, lineno)
            entries.append(entry)
    return entries

# ----------------------------------------------------------------------------
# the grammar: templates over the lexicon's slots

# {slot} is filled from the lexicon; any other token is a "frame" word of the lexicon, word|pinyin for a polyphone
ZH_TEMPLATES = [
    "{pron} {time} 想 吃 {food}", "{pron} {time} 想 喝 {drink}", "{pron} 想 {verb_eat} 一点 {food}",
    "{pron} {time} 去 {place} {verb_buy} {thing}", "{pron} {time} 要 去 {place}", "{pron} 在 {place} {activity}",
    "{family} 在 {place} 等 {pron}", "{pron} 的 {thing} 太 {adj} 了", "这 个 {thing} 很 {adj}",
    "{time} 的 {event} 很 {adj}", "{pron} {time} 有 一 个 {event}", "{pron} 觉得 {food} 很 {adj}",
    "{pron} 喜欢 {activity}", "{pron} 不 喜欢 喝 {drink}", "{job} 说 {pron} {time} 要 去 {place}",
    "{pron} 坐 {vehicle} 去 {place}", "{pron} {time} 再 来 {place} 吧", "{pron} 把 {thing} 给 {family} 了",
    "{family} 送 {pron} 一 个 {thing}", "{pron} 跟 {family} 一起 {activity}", "{pron} {time} 没有 {activity}",
    "{place} 的 {food} 很 {adj}", "{pron} 每天 都 {activity}", "我 可以 用 {family} 的 {thing} 吗",
    "{pron} 的 {family} 是 {job}", "你 现在 在 {place} 吗", "{pron} {time} 几 点 {activity}",
    "这 个 {thing} 几 块 钱", "{pron} 的 {thing} 在 {place}", "{pron} 忘 了 带 {thing}", "{time} 天气 很 {weather}",
    "{pron} {time} 得|dei3 去 {place}", "{pron} 的 {lang} 说 得|de5 很 {manner}",
    "{family} 让 {pron} 去 {place} {verb_eat} {food}", "{pron} 已经 {verb_eat} 了 {food}",
    "{pron} 觉得 这 个 {event} 太 {adj} 了", "{pron} 还 没有 {verb_buy} {thing}", "{job} 正在 {place} {activity}",
    "{pron} 打算 {time} 去 {place} {activity}", "{job} 教 {pron} {lang}", "{pron} {time} 有 事",
    "你 可以 试 一下 这 个 {thing}",
]
EN_TEMPLATES = [
    "i want to {verb_eat} {food}", "we should go to {place} {time}", "my {family} works at {place}",
    "the {thing} is too {adj}", "i left my {thing} at {place}", "i have a {event} {time}",
    "we took the {vehicle} to {place}", "do you like {food}", "i will go {activity} {time}",
    "my {family} speaks {lang}", "can you {verb_buy} my {thing}", "the {drink} here is {adj}",
]


@dataclass(frozen=True)
class Sentence:
    units: tuple[str, ...]           # one Mandarin character or one English word each
    pinyin: tuple[str | None, ...]   # the tonal syllable of each Mandarin unit, None for an English one

    @property
    def text(self):
        return " ".join(self.units)


def compile_templates(lexicon):
    """[(frame language, parts)]: a part is a fixed Entry or a slot's fillers {"zh": [...], "en": [...]}.
    ValueError for a slot nothing fills or a fixed word without exactly one "frame" line."""
    fillers, frame = {}, {}
    for e in lexicon:
        if e.slot == "frame":
            frame.setdefault(e.word, []).append(e)
        else:
            fillers.setdefault(e.slot, {"zh": [], "en": []})[e.lang].append(e)
    grammar = []
    for lang, template in [("zh", t) for t in ZH_TEMPLATES] + [("en", t) for t in EN_TEMPLATES]:
        parts = []
        for token in template.split():
            if token.startswith("{"):
                if token[1:-1] not in fillers:
                    raise ValueError(f"template {template!r}: no lexicon word fills slot {token}")
                parts.append(fillers[token[1:-1]])
                continue
            word, _, pinyin = token.partition("|")
            found = [e for e in frame.get(word, []) if not pinyin or e.pinyin == tuple(pinyin.split())]
            if len(found) != 1:
                raise ValueError(f"template {template!r}: {token!r} needs one 'frame' line in the lexicon, has "
                                 f"{len(found)}")
            parts.append(found[0])
        grammar.append((lang, parts))
    return grammar


def capacity(lexicon):
    """How many sentences of MIN_UNITS..MAX_UNITS units the grammar can make: per template, the number of
    fillings by length (a convolution over the slots), summed over the lengths in range."""
    total = 0
    for _, parts in compile_templates(lexicon):
        counts = {0: 1}  # units so far -> number of fillings
        for part in parts:
            words = [part] if isinstance(part, Entry) else part["zh"] + part["en"]
            grown = {}
            for n, c in counts.items():
                for e in words:
                    size = n + (len(e.word) if e.lang == "zh" else 1)
                    grown[size] = grown.get(size, 0) + c
            counts = grown
        total += sum(c for n, c in counts.items() if MIN_UNITS <= n <= MAX_UNITS)
    return total


def draw(rng, lang, parts, zipf=0.0):
    """One sentence of a compiled template: each slot filled in the other language with P_EN (P_ZH), its word
    drawn uniformly (zipf 0) or the k-th with weight 1 / k^zipf."""
    other, p_other = ("en", P_EN) if lang == "zh" else ("zh", P_ZH)
    units, pinyin = [], []
    for part in parts:
        if not isinstance(part, Entry):
            switch = rng.random() < p_other
            words = part[other] if (switch and part[other]) or not part[lang] else part[lang]
            if zipf:
                part = rng.choices(words, [k ** -zipf for k in range(1, len(words) + 1)])[0]
            else:
                part = rng.choice(words)  # the default corpus as it always was drawn
        if part.lang == "zh":
            units += part.word
            pinyin += part.pinyin
        else:
            units.append(part.word)
            pinyin.append(None)
    return Sentence(tuple(units), tuple(pinyin))


def unique_sentences(seed, lexicon, zipf=0.0):
    """An endless stream of distinct sentences (by text), in an order fixed by the seed."""
    grammar, rng, seen = compile_templates(lexicon), random.Random(seed), set()
    while True:
        s = draw(rng, *rng.choice(grammar), zipf)
        if MIN_UNITS <= len(s.units) <= MAX_UNITS and s.text not in seen:
            seen.add(s.text)
            yield s


def sentences(n, seed, lexicon, zipf=0.0):
    """n distinct code-switched sentences, the same ones for the same (n, seed); sentences(n + 1) extends them."""
    if n > capacity(lexicon):
        raise ValueError(f"{n} distinct sentences asked for, the grammar makes {capacity(lexicon)}")
    return list(itertools.islice(unique_sentences(seed, lexicon, zipf), n))


def is_heldout(sentence):
    return zlib.crc32(sentence.text.encode()) % 100 < HELDOUT_PERCENT

# ----------------------------------------------------------------------------
# speech: espeak-ng speakers, SSML, resampling

TRAIN_VARIANTS = ("m1", "m2", "m3", "m6", "f1", "f2", "f4", "klatt")  # from espeak-ng-data/voices/!v
HELDOUT_VARIANTS = ("m4", "f3")  # one male, one female voice that training never hears
SPEEDS = (140, 160, 180, 200)    # words per minute
PITCHES = (35, 50, 65)           # 0-99


@dataclass(frozen=True)
class Speaker:
    variant: str
    speed: int
    pitch: int

    @property
    def name(self):
        return f"{self.variant}-s{self.speed}-p{self.pitch}"


SPEAKERS_TRAIN = [Speaker(v, s, p) for v in TRAIN_VARIANTS for s in SPEEDS for p in PITCHES]
SPEAKERS_HELDOUT = [Speaker(v, s, p) for v in HELDOUT_VARIANTS for s in SPEEDS for p in PITCHES]


def check_espeak():
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: install it (Debian: apt-get install espeak-ng) and run again")


def ssml(sentence, variant=None):
    """The SSML espeak-ng reads (with -m): each run of one language in a <voice> of its own, Mandarin runs as
    tonal pinyin for cmn-latn-pinyin (v written ü), English runs for en-us; variant (e.g. "f2") names the voice
    variant of both."""
    suffix = f"+{variant}" if variant else ""
    runs = []
    for is_zh, run in itertools.groupby(zip(sentence.units, sentence.pinyin), key=lambda u: u[1] is not None):
        if is_zh:
            runs.append(f'<voice name="cmn-latn-pinyin{suffix}">'
                        f'{" ".join(p.replace("v", "ü") for _, p in run)}</voice>')
        else:
            runs.append(f'<voice name="en-us{suffix}">{escape(" ".join(u for u, _ in run))}</voice>')
    return f"<speak>{' '.join(runs)}</speak>"


def resample(x, rate_in, rate_out):
    """x (float, 1-D) from rate_in to rate_out Hz, band-limited: the spectrum up to the lower of the two Nyquist
    frequencies is kept (downsampling) or zero-padded (upsampling), the Nyquist bin itself dropped."""
    n = len(x)
    m = round(n * rate_out / rate_in)
    X = np.fft.rfft(x)                        # (n // 2 + 1,)
    Y = np.zeros(m // 2 + 1, dtype=X.dtype)   # (m // 2 + 1,)
    keep = (min(n, m) + 1) // 2               # bins strictly below both Nyquist frequencies
    Y[:keep] = X[:keep]
    return np.fft.irfft(Y, m) * (m / n)       # irfft divides by m, rfft summed n samples


def trim(x):
    """x without its leading and trailing silence, PAD samples of zeros put back on each side."""
    loud = np.flatnonzero(np.abs(x) > SILENCE)
    if len(loud) == 0:
        raise RuntimeError("espeak-ng produced silence")
    return np.pad(x[loud[0]:loud[-1] + 1], PAD)


def synthesize(sentence, speaker):
    """The sentence read by the speaker: int16 samples at 16 kHz, mono."""
    check_espeak()
    fd, path = tempfile.mkstemp(suffix=".wav")  # a file: the WAV header espeak-ng writes to stdout has no length
    os.close(fd)
    try:
        run = subprocess.run(["espeak-ng", "-m", "-s", str(speaker.speed), "-p", str(speaker.pitch), "-w", path,
                              ssml(sentence, speaker.variant)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"espeak-ng failed ({run.returncode}) on {sentence.text!r}: {run.stderr.strip()}")
        with wave.open(path, "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise RuntimeError(f"espeak-ng wrote {w.getnchannels()} channels of {8 * w.getsampwidth()} bits, "
                                   f"expected 16-bit mono")
            rate, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    finally:
        os.remove(path)
    y = resample(x.astype(np.float64), rate, SAMPLE_RATE)
    return trim(np.clip(np.round(y), -32768, 32767).astype(np.int16))


def synthesize_pair(pair):
    return synthesize(*pair)

# ----------------------------------------------------------------------------
# the corpus


def write_atomically(path, write):
    # a temp file beside the target, then a rename: an interrupted run never leaves a half-written file
    with open(path + ".tmp", "wb") as f:
        write(f)
    os.replace(path + ".tmp", path)


def write_jsonl(path, records):
    write_atomically(path, lambda f: f.write("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in records).encode()))


def write_split(out_dir, split, pairs, pool):
    """Speak (sentence, speaker) pairs into <split>.npz and <split>.jsonl; returns the hours of audio."""
    t0 = time.time()
    jobs = pool.imap(synthesize_pair, pairs, chunksize=8) if pool else map(synthesize_pair, pairs)
    audio = list(tqdm(jobs, total=len(pairs), desc=split, unit="utt"))
    offsets = np.zeros(len(audio) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in audio], out=offsets[1:])
    write_atomically(os.path.join(out_dir, f"{split}.npz"),
                     lambda f: np.savez(f, audio=np.concatenate(audio), offsets=offsets))
    write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), [{"units": list(s.units), "pinyin": list(s.pinyin),
                                                           "speaker": speaker.name} for s, speaker in pairs])
    hours = offsets[-1] / SAMPLE_RATE / 3600
    print(f"{split}: {len(pairs):,} utterances, {hours:.2f} h of audio, {time.time() - t0:.0f} s")
    return hours


def split_sentences(seed, lexicon, n_train, n_heldout, zipf=0.0):
    """The first n_train training and n_heldout held-out sentences of the seed's stream."""
    train, heldout = [], []
    for s in unique_sentences(seed, lexicon, zipf):
        split = heldout if is_heldout(s) else train
        if len(split) < (n_heldout if split is heldout else n_train):
            split.append(s)
        if len(train) == n_train and len(heldout) == n_heldout:
            return train, heldout


def main(argv=None):
    ap = argparse.ArgumentParser(description="a synthetic Mandarin-English code-switching speech corpus (espeak-ng)")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--n_train", type=int, default=4000, help="training utterances")
    ap.add_argument("--n_val", type=int, default=200, help="held-out sentences read by training speakers")
    ap.add_argument("--n_test", type=int, default=300, help="held-out sentences read by held-out speakers")
    ap.add_argument("--n_text", type=int, default=20000, help="training sentences without audio, for a text model")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--workers", type=int, default=2, help="espeak-ng processes at a time")
    ap.add_argument("--lexicon", default=LEXICON, help="lexicon files, comma-separated, read in order")
    ap.add_argument("--zipf", type=float, default=0.0, help="a slot's k-th word drawn with weight 1/k^zipf")
    args = ap.parse_args(argv)
    for flag in ("n_train", "n_val", "n_test", "n_text", "workers"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if not 0 <= args.zipf <= 4:
        ap.error(f"--zipf must be in [0, 4], got {args.zipf}")
    try:
        lexicon = read_lexicon(args.lexicon)
    except (OSError, ValueError) as e:
        ap.error(f"--lexicon: {e}")
    # drawing distinct sentences at random slows down as the grammar runs out: ask for at most half of them
    most = capacity(lexicon) // 2
    if args.n_val + args.n_test > most * HELDOUT_PERCENT // 100:
        ap.error(f"--n_val + --n_test = {args.n_val + args.n_test:,}: the grammar makes too few distinct held-out "
                 f"sentences, ask for at most {most * HELDOUT_PERCENT // 100:,}")
    if max(args.n_train, args.n_text) > most * (100 - HELDOUT_PERCENT) // 100:
        flag = "--n_train" if args.n_train > args.n_text else "--n_text"
        ap.error(f"{flag} = {max(args.n_train, args.n_text):,}: the grammar makes too few distinct training "
                 f"sentences, ask for at most {most * (100 - HELDOUT_PERCENT) // 100:,}")
    check_espeak()

    t0 = time.time()
    train, heldout = split_sentences(args.seed, lexicon, max(args.n_train, args.n_text), args.n_val + args.n_test,
                                     args.zipf)
    rng = random.Random(args.seed)
    splits = {
        "train": [(s, rng.choice(SPEAKERS_TRAIN)) for s in train[:args.n_train]],
        "val": [(s, rng.choice(SPEAKERS_TRAIN)) for s in heldout[:args.n_val]],
        "test": [(s, rng.choice(SPEAKERS_HELDOUT)) for s in heldout[args.n_val:]],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an old meta.json beside new files must never pass for a complete corpus
    with Pool(args.workers) if args.workers > 1 else nullcontext() as pool:  # one worker: no pool (None)
        hours = {split: write_split(args.out_dir, split, pairs, pool) for split, pairs in splits.items()}
    write_jsonl(os.path.join(args.out_dir, "text.jsonl"), [{"units": list(s.units), "pinyin": list(s.pinyin)}
                                                           for s in train[:args.n_text]])
    speakers = {"train": SPEAKERS_TRAIN, "val": SPEAKERS_TRAIN, "test": SPEAKERS_HELDOUT}
    meta = {"sample_rate": SAMPLE_RATE, "seed": args.seed,
            "counts": {**{split: len(pairs) for split, pairs in splits.items()}, "text": args.n_text},
            "hours": {split: round(h, 4) for split, h in hours.items()},
            "speakers": {split: [s.name for s in group] for split, group in speakers.items()},
            "lexicon": {"zh_chars": len({c for e in lexicon if e.lang == "zh" for c in e.word}),
                        "en_words": len({e.word for e in lexicon if e.lang == "en"}),
                        "files": [os.path.basename(p) for p in args.lexicon.split(",")], "zipf": args.zipf},
            "heldout_percent": HELDOUT_PERCENT}
    write_atomically(meta_path, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    print(f"text: {args.n_text:,} sentences; {sum(hours.values()):.2f} h of audio in {time.time() - t0:.0f} s "
          f"-> {args.out_dir}")


if __name__ == "__main__":
    main()

# python data/speech/prepare.py  (2-core CPU, espeak-ng 1.51; 614 MB peak memory, 302 MB written)
# train: 4,000 utterances, 2.40 h of audio, 102 s
# val: 200 utterances, 0.12 h of audio, 5 s
# test: 300 utterances, 0.19 h of audio, 9 s
# text: 20,000 sentences; 2.71 h of audio in 116 s -> data/speech
