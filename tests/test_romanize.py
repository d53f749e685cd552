"""
tests/test_romanize.py: romanize.py on a small code-switching fixture of its own (no data/speech files needed):
pinyin splitting against a table, BPE pieces joining back into their words, the concatenated tokenizer's
ranges, sizes and round trips (and garbage ids), and Roman2Char resolving homophones from context where the
frequency baseline cannot, saved and loaded exactly.
Run: python -m pytest -q tests/test_romanize.py
"""
import json, os, random
from collections import Counter

import pytest
import torch

import romanize
from romanize import WORD_START, build_tokenizer, split_syllable, train_bpe

# -----------------------------------------------------------------------------
# the fixture: ta1 is 他 / 她 / 它 and shi4 is 是 / 市 / 事, and a neighbouring word tells which

NOUNS = {  # (units, pinyin, character of ta1)
    "哥哥": (["哥", "哥"], ["ge1", "ge5"], "他"), "爸爸": (["爸", "爸"], ["ba4", "ba5"], "他"),
    "brother": (["brother"], [None], "他"), "father": (["father"], [None], "他"),
    "姐姐": (["姐", "姐"], ["jie3", "jie5"], "她"), "妈妈": (["妈", "妈"], ["ma1", "ma5"], "她"),
    "sister": (["sister"], [None], "她"), "mother": (["mother"], [None], "她"),
    "猫": (["猫"], ["mao1"], "它"), "狗": (["狗"], ["gou3"], "它"),
    "cat": (["cat"], [None], "它"), "dog": (["dog"], [None], "它"),
}
ENDINGS = [(["很", "好"], ["hen3", "hao3"]), (["很", "高"], ["hen3", "gao1"]), (["very", "happy"], [None, None]),
           (["想", "吃", "green", "apple"], ["xiang3", "chi1", None, None])]


def sentence(template, noun, ending):
    (nu, npy, ta), (eu, epy), TA = NOUNS[noun], ending, (["ta1"], ["ta1"])
    parts = {  # ta1 before or after its noun; shi4 as the copula, the city (上海市) or the matter (没事)
        0: [TA, (["是"], ["shi4"]), (["我", "的"], ["wo3", "de5"]), (nu, npy), (eu, epy)],
        1: [(["我", "的"], ["wo3", "de5"]), (nu, npy), (["说"], ["shuo1"]), TA, (eu, epy)],
        2: [(nu, npy), (["在", "上", "海", "市"], ["zai4", "shang4", "hai3", "shi4"]), TA, (eu, epy)],
        3: [(nu, npy), (["说", "没", "事"], ["shuo1", "mei2", "shi4"]), TA, (eu, epy)],
    }[template]
    units = [ta if u == "ta1" else u for us, _ in parts for u in us]
    return {"units": units, "pinyin": [p for _, ps in parts for p in ps]}


ENGLISH = "my brother and sister say the green apple is very good but the cat wants to eat fish".split()


def fixture():
    """(train, held out): every template x noun x ending; each held-out sentence's combination of template,
    noun and ending is never trained on, but its noun is seen with ta1 in other sentences."""
    train, held = [], []
    for i, (t, noun, e) in enumerate((t, n, e) for t in range(4) for n in NOUNS for e in range(len(ENDINGS))):
        (held if i % 7 == 3 else train).append(sentence(t, noun, ENDINGS[e]))
    return train, held


def english(n=100, seed=0):
    """n English-only sentences of 6 to 10 words, to give the tokenizer test balanced shares."""
    rng = random.Random(seed)
    units = [rng.choices(ENGLISH, k=rng.randrange(6, 11)) for _ in range(n)]
    return [{"units": u, "pinyin": [None] * len(u)} for u in units]


# -----------------------------------------------------------------------------
# 1) pinyin

@pytest.mark.parametrize("s, initial, final, tone", [
    ("zhuang1", "zh", "uang", 1), ("chuang2", "ch", "uang", 2), ("shi4", "sh", "i", 4), ("ri4", "r", "i", 4),
    ("xiang1", "x", "iang", 1), ("de5", "d", "e", 5), ("lv4", "l", "v", 4), ("nve4", "n", "ve", 4),
    ("ju4", "j", "v", 4), ("quan2", "q", "van", 2), ("xue2", "x", "ve", 2), ("jun1", "j", "vn", 1),
    ("liu2", "l", "iou", 2), ("gui4", "g", "uei", 4), ("lun2", "l", "uen", 2), ("er2", "", "er", 2),
    ("a1", "", "a", 1), ("ang2", "", "ang", 2), ("ou1", "", "ou", 1), ("e4", "", "e", 4),
    ("yi1", "", "i", 1), ("ya1", "", "ia", 1), ("you3", "", "iou", 3), ("yan4", "", "ian", 4),
    ("ying1", "", "ing", 1), ("yong3", "", "iong", 3), ("yu2", "", "v", 2), ("yue4", "", "ve", 4),
    ("yuan2", "", "van", 2), ("yun2", "", "vn", 2), ("wu3", "", "u", 3), ("wo3", "", "uo", 3),
    ("wei4", "", "uei", 4), ("wen2", "", "uen", 2), ("weng1", "", "ueng", 1),
])
def test_split_syllable(s, initial, final, tone):
    syl = split_syllable(s)
    assert (syl.initial, syl.final, syl.tone, syl.toneless) == (initial, final, tone, s[:-1])
    assert syl.initial in romanize.INITIALS + ("",) and syl.final in romanize.FINALS


@pytest.mark.parametrize("s", ["xiang", "xiang6", "xiang0", "Xiang1", "xi ang1", "1", "", "i1", "u3", "v4", "bx1",
                               "ler4", "wi1", "yv2", "y1", "w2", "wuo3", "yiu4", "zhuangg1", "ng2", "lü4", None])
def test_split_syllable_refuses_malformed(s):
    with pytest.raises(ValueError, match="malformed pinyin syllable"):
        split_syllable(s)


# -----------------------------------------------------------------------------
# 2) BPE

WORDS = Counter({"green": 5, "apple": 4, "grape": 3, "happy": 3, "app": 2, "pear": 2, "mother": 1, "brother": 1})


def test_bpe_pieces_join_back_into_the_word():
    bpe = train_bpe(WORDS, 40)
    assert len(bpe.pieces) == 40 and len(set(bpe.pieces)) == 40
    for word in [*WORDS, "pale", "paper", "hear", "gape", "moth", "brat", "a", "pp"]:  # trained, then unseen
        pieces = bpe.encode(word)
        assert "".join(pieces) == WORD_START + word, (word, pieces)
        assert pieces[0].startswith(WORD_START) and not any(p.startswith(WORD_START) for p in pieces[1:])
        assert all(p in bpe.index for p in pieces)
    with pytest.raises(ValueError, match="not in the BPE alphabet"):
        bpe.encode("zebra")  # no word of the fixture starts with z, none holds a z


def test_bpe_merges_the_most_frequent_pair_then_the_smallest():
    bpe = train_bpe(Counter({"cd": 1, "ab": 1, "xy": 2}), 10)  # base symbols: ▁ a b c d x y
    assert bpe.merges == [("x", "y"), (WORD_START, "xy"), ("a", "b")]  # 2 before 1, then the smallest pair
    assert train_bpe(WORDS, 40) == train_bpe(Counter(dict(reversed(WORDS.items()))), 40)  # order-free
    assert train_bpe(Counter({"ab": 1}), 100).pieces == ["a", "b", WORD_START, "ab", WORD_START + "ab"]  # no pair left


# -----------------------------------------------------------------------------
# 3) the balanced concatenated tokenizer

def test_tokenizer_ranges_sizes_and_round_trips():
    train, held = fixture()
    train += english()
    units = [(u, p) for s in train for u, p in zip(s["units"], s["pinyin"])]
    p_zh = sum(p is not None for _, p in units) / len(units)  # 0.51: 41 Mandarin and 39 English pieces of 80
    roman, char = build_tokenizer(train, "roman", 80), build_tokenizer(train, "char", 80)
    k_zh = round(p_zh * 80)
    assert roman.vocab_size == 1 + 80 and roman.zh_start - roman.en_start == 80 - k_zh == char.zh_start - 1
    assert char.zh.pieces == sorted({u for u, p in units if p is not None}) and not char.zh.merges
    assert char.vocab_size == char.zh_start + len({u for u, p in units if p is not None})
    for tok in (roman, char):
        for s in train + held:
            ids = tok.encode(s["units"], s["pinyin"])
            lang = ["en" if tok.en_start <= i < tok.zh_start else "zh" for i in ids]
            assert 0 not in ids and all(tok.en_start <= i < tok.vocab_size for i in ids)
            assert lang.count("zh") >= sum(p is not None for p in s["pinyin"])  # Mandarin ids in its own range
            want = romanize.romanize(s["units"], s["pinyin"]) if tok.mode == "roman" else s["units"]
            assert tok.decode(ids) == want
            assert romanize.ConcatTokenizer.from_dict(tok.to_dict()).decode(ids) == want
    assert 1 - roman.vocab_size / char.vocab_size == romanize.vocabulary_reduction(char, roman)
    with pytest.raises(ValueError, match="not in the Mandarin range"):  # a character never in the transcripts
        char.encode(["green", "龘", "她"], [None, "da2", "ta1"])
    assert char.encode(["green", "龘", "她"], [None, "da2", "ta1"], unknown=0) == (
        char.encode(["green"], [None]) + [0] + char.encode(["她"], ["ta1"]))  # or spelled as the id given
    assert roman.is_mandarin("ta1") and roman.is_mandarin("她") and not roman.is_mandarin("apple")


def test_tokenizer_refuses_a_vocabulary_too_small_for_its_alphabet():
    text = fixture()[0] + english()
    build_tokenizer(text, "roman", 60)
    with pytest.raises(ValueError, match="vocab_size=40 is too small"):  # 20 English pieces for 22 base symbols
        build_tokenizer(text, "roman", 40)
    with pytest.raises(ValueError, match="mode"):
        build_tokenizer(text, "pinyin", 60)


def test_decode_of_any_ids_never_crashes():
    """Blanks and out-of-range ids are dropped; a continuation piece starts a unit of its own when nothing of
    its range comes before it."""
    tok = build_tokenizer(fixture()[0] + english(), "roman", 80)
    en_cont = next(i for i, p in enumerate(tok.en.pieces, tok.en_start) if not p.startswith(WORD_START))
    zh_start = next(i for i, p in enumerate(tok.zh.pieces, tok.zh_start) if p.startswith(WORD_START) and p[1:])
    marker = tok.zh_start + tok.zh.pieces.index(WORD_START)
    zh_cont = next(i for i, p in enumerate(tok.zh.pieces, tok.zh_start) if not p.startswith(WORD_START))
    piece = lambda i: (tok.en.pieces + tok.zh.pieces)[i - 1]
    assert tok.decode([en_cont]) == [piece(en_cont)]
    assert tok.decode([0, zh_start, -5, en_cont, 10 ** 6, zh_cont]) == [piece(zh_start)[1:], piece(en_cont),
                                                                        piece(zh_cont)]
    assert tok.decode([zh_start, 0, zh_cont]) == [piece(zh_start)[1:] + piece(zh_cont)]
    assert tok.decode([marker, zh_cont, marker]) == [piece(zh_cont)]  # a lone marker at the end spells nothing
    rng, char = random.Random(0), build_tokenizer(fixture()[0] + english(), "char", 80)
    assert char.decode([char.zh_start, char.zh_start + 1, en_cont]) == [*char.zh.pieces[:2], piece(en_cont)]
    for t in (tok, char):
        for _ in range(200):
            units = t.decode([rng.randrange(-3, t.vocab_size + 3) for _ in range(rng.randrange(12))])
            assert all(isinstance(u, str) and u for u in units)


# -----------------------------------------------------------------------------
# 4) Roman2Char

@pytest.fixture(scope="module")
def trained():
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)  # as conftest's one_thread, for the module
    train, held = fixture()
    model = romanize.train_roman2char(train, steps=250, batch_size=32, lr=1e-2, seed=0)
    torch.set_num_threads(threads)
    return model, train, held


def test_roman2char_resolves_homophones_from_context(trained):
    """Held-out fixture sentences: Roman2Char at least 95% of the Mandarin positions and of the homophone ones
    (ta1, shi4); the frequency baseline can only pick one character per syllable (under 60% there)."""
    model, train, held = trained
    roman = [romanize.romanize(s["units"], s["pinyin"]) for s in held]
    ours = romanize.char_accuracy(romanize.to_chars_batch(model, roman), held, model.candidates)
    baseline = romanize.frequency_baseline(train)
    base = romanize.char_accuracy([[baseline(u) for u in r] for r in roman], held, model.candidates)
    assert sorted(model.candidates["ta1"]) == sorted("他她它") and len(model.candidates["shi4"]) == 3
    assert ours.n_homophone == base.n_homophone > 0
    assert ours.percent() >= 95 and ours.percent(True) >= 95, (ours, base)
    assert base.percent(True) < 60 and ours.percent(True) > base.percent(True) + 35, (ours, base)


def test_roman2char_round_trip_and_unknown_units(trained):
    """Romanize -> Roman2Char gives back every training sentence; an unseen English word is context like any
    other; a syllable with no candidate stays as it is."""
    model, train, _ = trained
    for s in train:
        assert romanize.to_chars(model, romanize.romanize(s["units"], s["pinyin"])) == s["units"]
    out = romanize.to_chars(model, ["ta1", "shi4", "wo3", "de5", "banana", "zhuang1"])
    assert out[1:] == ["是", "我", "的", "banana", "zhuang1"] and out[0] in "他她它"
    assert romanize.to_chars(model, []) == [] and romanize.to_chars_batch(model, []) == []


def test_candidates_from_a_lexicon_and_the_frequency_rule():
    """Candidates: most frequent reading first, ties by the character's frequency over all the text; a
    lexicon-only syllable is a candidate the text never trained, and Roman2Char gives it its first candidate."""
    class Entry:  # prepare.read_lexicon's entries have these fields
        def __init__(self, lang, word, pinyin): self.lang, self.word, self.pinyin = lang, word, pinyin
    text = [{"units": ["他", "她", "她", "行", "行"], "pinyin": ["ta1", "ta1", "ta1", "xing2", "xing2"]},
            {"units": ["行"], "pinyin": ["hang2"]}]
    table = romanize.candidate_table(text, [Entry("zh", "银行", ("yin2", "hang2")), Entry("zh", "它", ("ta1",)),
                                            Entry("en", "apple", ())])
    assert table == {"ta1": ["她", "他", "它"], "xing2": ["行"], "hang2": ["行"], "yin2": ["银"]}
    assert romanize.count_readings(text) == (Counter({("ta1", "她"): 2, ("xing2", "行"): 2, ("ta1", "他"): 1,
                                                      ("hang2", "行"): 1}), Counter({"行": 3, "她": 2, "他": 1}))
    baseline = romanize.frequency_baseline(text)
    assert [baseline(s) for s in ("ta1", "hang2", "yin2")] == ["她", "行", "yin2"]
    model = romanize.train_roman2char(text, steps=2, batch_size=2, lexicon=[Entry("zh", "银行", ("yin2", "hang2"))])
    assert romanize.to_chars(model, ["yin2", "hang2", "bank", "zhuang1"]) == ["银", "行", "bank", "zhuang1"]


def test_save_load_gives_identical_outputs(trained, tmp_path):
    model, _, held = trained
    romanize.save(model, tmp_path / "roman2char.pt")
    loaded = romanize.load(tmp_path / "roman2char.pt")
    x, lengths = model.ids([romanize.romanize(s["units"], s["pinyin"]) for s in held])
    with torch.no_grad():
        assert torch.equal(model(x, lengths), loaded(x, lengths))
    assert loaded.units == model.units and loaded.chars == model.chars and loaded.candidates == model.candidates


def test_cli_without_data_says_what_to_run(tmp_path):
    from helpers import run_script
    out = run_script("romanize.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path}/out")
    assert out.returncode == 1 and "python3 data/speech/prepare.py" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out")


def test_cli_smoke(tmp_path):
    """Smoke test: the command line on the fixture writes roman2char.pt and prints its figures (the numbers are
    checked above, on the functions it calls)."""
    from helpers import run_script
    train, held = fixture()
    for split, sentences in {"train": train + english(), "text": train, "val": held, "test": held}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sentences))
    out = run_script("romanize.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path}/out", "--vocab_size=80",
                     "--steps=20", "--threads=1")
    assert out.returncode == 0, out.stderr
    assert "roman: 1 blank + 39 English + 41 Mandarin = 81 ids" in out.stdout and "frequency" in out.stdout
    assert romanize.load(tmp_path / "out" / "roman2char.pt").candidates == romanize.candidate_table(train)
