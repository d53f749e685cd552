"""
Tests for the code-switching speech corpus (data/speech/prepare.py, data/speech/lexicon.tsv): the lexicon's
checks, the grammar (deterministic, code-switched, polyphones read by their word), the split (no held-out
sentence in train or text), the audio (int16, 16 kHz, offsets, not silent) and the resampler (a sine keeps
its frequency). Needs espeak-ng for the corpus tests.

    python -m pytest -q tests/test_speech_data.py
"""
import collections
import json
import os
import shutil

import numpy as np
import pytest

from data.speech import prepare as speech

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def lexicon():
    return speech.read_lexicon()


def test_lexicon_sizes_and_syllables(lexicon):
    """Every zh word has one tonal syllable per character; the sizes and homophones the grammar was built for."""
    pairs = set()
    for e in lexicon:
        if e.lang == "zh":
            assert len(e.pinyin) == len(e.word), e
            pairs |= set(zip(e.word, e.pinyin))
        else:
            assert e.pinyin == () and e.word.islower(), e
    zh_chars = {c for c, _ in pairs}
    en_words = {e.word for e in lexicon if e.lang == "en"}
    assert 180 <= len(zh_chars) <= 260 and 100 <= len(en_words) <= 150, (len(zh_chars), len(en_words))
    by_syllable = collections.defaultdict(set)
    for c, s in pairs:
        by_syllable[s].add(c)
    shared = {s for s, chars in by_syllable.items() if len(chars) > 1}
    assert len(shared) >= 25, sorted(shared)
    assert {"他", "她", "它"} <= by_syllable["ta1"] and {"在", "再"} <= by_syllable["zai4"]
    readings = {e.word: e.pinyin for e in lexicon if e.lang == "zh" and e.slot != "frame"}
    assert readings["银行"] == ("yin2", "hang2") and readings["旅行"] == ("lv3", "xing2")
    assert readings["睡觉"] == ("shui4", "jiao4") and readings["女儿"] == ("nv3", "er2")


@pytest.mark.parametrize("line, problem", [
    ("zh\t银行\tyin2\tplace", "2 characters but 1 syllables"),
    ("zh\t银行\tyin2 hang\tplace", "'hang'"),
    ("zh\t银行\tyin2 hang6\tplace", "'hang6'"),
    ("zh\tbank\tbank1\tplace", "1-3 Chinese characters"),
    ("en\tbank\tplace", "3 tab-separated fields"),
    ("en\tBank\t\tplace", "one lowercase English word"),
    ("fr\tbanque\t\tplace", "unknown lang 'fr'"),
    ("zh\t书\tshu1\tthing", "repeats line 4"),
])
def test_malformed_line_names_the_line(tmp_path, line, problem):
    path = tmp_path / "lexicon.tsv"
    path.write_text("# a comment\nlang\tword\tpinyin\tslot\n\nzh\t书\tshu1\tthing\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 5") as e:
        speech.read_lexicon(str(path))
    assert problem in str(e.value) and line.split("\t")[1] in str(e.value)
    path.write_text("lang word pinyin slot\nzh\t书\tshu1\tthing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        speech.read_lexicon(str(path))


def test_sentences_deterministic_and_code_switched(lexicon):
    """Same (n, seed), same sentences; a longer n extends them; distinct, 4-14 units, pinyin on exactly the
    Mandarin units and each (character, syllable) one of the lexicon's; most sentences mix both languages."""
    a = speech.sentences(400, 7, lexicon)
    assert a == speech.sentences(400, 7, lexicon) and a[:100] == speech.sentences(100, 7, lexicon)
    assert a != speech.sentences(400, 8, lexicon)
    assert len({s.text for s in a}) == 400
    zh_pairs = {(c, p) for e in lexicon if e.lang == "zh" for c, p in zip(e.word, e.pinyin)}
    en_words = {e.word for e in lexicon if e.lang == "en"}
    for s in a:
        assert 4 <= len(s.units) <= 14 and len(s.pinyin) == len(s.units) and s.text == " ".join(s.units)
        for u, p in zip(s.units, s.pinyin):
            assert (u, p) in zh_pairs if p is not None else u in en_words, (s.text, u, p)
    mixed = [s for s in a if None in s.pinyin and any(p is not None for p in s.pinyin)]
    assert len(mixed) > 0.6 * len(a)
    assert any(s.units[0] in ("i", "we", "my", "the", "do", "can") for s in mixed)  # English frames, zh fillers
    assert any("hang2" in s.pinyin for s in a) and any("xing2" in s.pinyin for s in a)  # 行, read by its word


LONGTAIL = speech.LEXICON + "," + speech.LEXICON.replace("lexicon.tsv", "lexicon_longtail.tsv")


def test_longtail_lexicon_adds_rare_words_and_homophones(lexicon):
    """lexicon_longtail.tsv reads after lexicon.tsv without a repeat, only into slots the grammar has, and
    adds characters (PET's rare tokens), many of them sounding like characters the base lexicon has."""
    both = speech.read_lexicon(LONGTAIL)
    extra = both[len(lexicon):]
    assert both[:len(lexicon)] == lexicon and len(extra) >= 100 and all(e.lang == "zh" for e in extra)
    assert {e.slot for e in extra} <= {e.slot for e in lexicon} - {"frame"}
    base = {(c, p) for e in lexicon if e.lang == "zh" for c, p in zip(e.word, e.pinyin)}
    new = {(c, p) for e in extra for c, p in zip(e.word, e.pinyin)} - base
    assert len({c for c, _ in new} - {c for c, _ in base}) >= 120
    assert len({(c, p) for c, p in new if p in {q for _, q in base}}) >= 20  # homophones of base characters


def test_homophone_lexicon_starts_words_with_a_frequent_sound(lexicon):
    """lexicon_homophones.tsv reads after lexicon.tsv without a repeat, into the grammar's slots, and half
    its words start with a character whose syllable and tone start another word of the same slot written
    with another character (place: 市场 and 事务所; thing: 试卷, 视频, 饰品): the first syllable alone
    cannot tell them apart."""
    both = speech.read_lexicon(speech.LEXICON + "," + speech.LEXICON.replace("lexicon.tsv", "lexicon_homophones.tsv"))
    extra = both[len(lexicon):]
    assert both[:len(lexicon)] == lexicon and len(extra) >= 40 and all(e.lang == "zh" for e in extra)
    assert {e.slot for e in extra} <= {e.slot for e in lexicon} - {"frame"}
    sounds = {(e.slot, e.pinyin[0]): set() for e in both if e.lang == "zh"}  # (slot, first syllable) -> chars
    for e in both:
        if e.lang == "zh":
            sounds[e.slot, e.pinyin[0]].add(e.word[0])
    shared = [e for e in extra if len(sounds[e.slot, e.pinyin[0]]) > 1]
    assert len(shared) >= 20, [e.word for e in extra if e not in shared]


def test_zipf_makes_the_last_words_of_a_slot_rare():
    """--zipf draws a slot's k-th word with weight 1 / k^s: the first words far commoner than the last; the
    default (zipf 0) is the uniform draw, the same sentences as without the argument."""
    both = speech.read_lexicon(LONGTAIL)
    assert speech.sentences(50, 3, both) == speech.sentences(50, 3, both, 0.0)
    drawn = speech.sentences(4000, 3, both, 1.2)
    counts = collections.Counter(u for s in drawn for u in s.units)
    places = [e.word for e in both if e.slot == "place" and e.lang == "zh"]  # 35: 17 base, then 18 rare
    head = sum(counts[c] for w in places[:3] for c in w)
    tail = sum(counts[c] for w in places[-3:] for c in w if not any(c in v for v in places[:-3]))
    assert head > 10 * tail > 0, (head, tail)
    rare = lambda c: sum(n <= 5 for n in c.values())  # character and word types seen at most 5 times
    uniform = collections.Counter(u for s in speech.sentences(4000, 3, both) for u in s.units)
    assert rare(counts) > 3 * rare(uniform), (rare(counts), rare(uniform))


def test_two_lexicons_name_a_repeat_across_files(tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    first.write_text("lang\tword\tpinyin\tslot\nzh\t书\tshu1\tthing\n", encoding="utf-8")
    second.write_text("lang\tword\tpinyin\tslot\nzh\t笔\tbi3\tthing\nzh\t书\tshu1\tthing\n", encoding="utf-8")
    assert [e.word for e in speech.read_lexicon(str(first))] == ["书"]
    with pytest.raises(ValueError, match=f"line 3: repeats line 2 of {first}"):
        speech.read_lexicon(f"{first},{second}")


def test_ssml_runs_and_variant():
    s = speech.Sentence(("the", "绿", "茶", "here", "is", "贵"), (None, "lv4", "cha2", None, None, "gui4"))
    assert speech.ssml(s, "f2") == (
        '<speak><voice name="en-us+f2">the</voice> <voice name="cmn-latn-pinyin+f2">lü4 cha2</voice> '
        '<voice name="en-us+f2">here is</voice> <voice name="cmn-latn-pinyin+f2">gui4</voice></speak>')
    assert '<voice name="en-us">the</voice>' in speech.ssml(s)


def test_resample_keeps_frequency_and_length():
    """A 1 kHz sine, 22050 -> 16000 Hz: the spectrum's peak stays at 1 kHz (bins are 1 Hz apart over 1 s),
    the length scales by 16000/22050 and the amplitude stays 1 (away from the circular edges)."""
    t = np.arange(22050) / 22050
    y = speech.resample(np.sin(2 * np.pi * 1000 * t), 22050, 16000)
    assert len(y) == 16000
    assert np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y) == 1000
    assert abs(np.abs(y[1000:-1000]).max() - 1) < 1e-3
    x = np.sin(2 * np.pi * 1000 * np.arange(4410) / 22050)  # not a whole number of output samples per period
    assert len(speech.resample(x, 22050, 16000)) == round(4410 * 16000 / 22050)


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path, lexicon):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    message = "espeak-ng not found: install it (Debian: apt-get install espeak-ng) and run again"
    with pytest.raises(SystemExit) as e:
        speech.synthesize(speech.sentences(1, 0, lexicon)[0], speech.SPEAKERS_TRAIN[0])
    assert e.value.code == message  # a string code: the interpreter prints it and exits with status 1
    with pytest.raises(SystemExit) as e:
        speech.main([f"--out_dir={tmp_path}", "--n_train=2", "--n_val=1", "--n_test=1", "--n_text=2"])
    assert e.value.code == message and not os.listdir(tmp_path)


@pytest.mark.parametrize("flags, named", [
    (["--n_train=0"], "--n_train"), (["--n_text=-1"], "--n_text"), (["--n_test=100000000"], "--n_test"),
    (["--zipf=-1"], "--zipf"), (["--lexicon=no/such.tsv"], "--lexicon")])
def test_bad_flags_exit_2(capsys, tmp_path, flags, named):
    with pytest.raises(SystemExit) as e:
        speech.main([f"--out_dir={tmp_path}", *flags])
    assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("speech")
    speech.main([f"--out_dir={out}", "--n_train=8", "--n_val=4", "--n_test=4", "--n_text=50", "--workers=1"])
    return out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_espeak
def test_heldout_sentences_stay_out_of_train_and_text(corpus):
    rows = {split: read_jsonl(corpus / f"{split}.jsonl") for split in ("train", "val", "test", "text")}
    assert [len(rows[s]) for s in ("train", "val", "test", "text")] == [8, 4, 4, 50]
    texts = {split: {" ".join(r["units"]) for r in split_rows} for split, split_rows in rows.items()}
    heldout = texts["val"] | texts["test"]
    assert len(heldout) == 8 and not heldout & (texts["train"] | texts["text"])
    assert texts["train"] <= texts["text"]
    heldout_variant = {s.variant for s in speech.SPEAKERS_HELDOUT}
    for split in ("train", "val", "test"):
        for r in rows[split]:
            sentence = speech.Sentence(tuple(r["units"]), tuple(r["pinyin"]))
            assert speech.is_heldout(sentence) == (split != "train")
            assert (r["speaker"].split("-")[0] in heldout_variant) == (split == "test"), (split, r["speaker"])
    assert not heldout_variant & {s.variant for s in speech.SPEAKERS_TRAIN}


@needs_espeak
def test_audio_int16_16khz_offsets_not_silent(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["sample_rate"] == 16000 and meta["counts"] == {"train": 8, "val": 4, "test": 4, "text": 50}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        with np.load(corpus / f"{split}.npz") as f:
            audio, offsets = f["audio"], f["offsets"]
        assert audio.dtype == np.int16 and offsets.dtype == np.int64 and offsets.shape == (n + 1,)
        assert offsets[0] == 0 and offsets[-1] == len(audio) and np.all(np.diff(offsets) > 2 * speech.PAD)
        for i in range(n):
            utt = audio[offsets[i]:offsets[i + 1]]
            seconds = len(utt) / 16000
            assert 0.5 < seconds < 10 and np.abs(utt).max() > 10 * speech.SILENCE, (split, i, seconds)
            assert not utt[:speech.PAD].any() and not utt[-speech.PAD:].any()  # trimmed, then 50 ms of quiet
        assert abs(meta["hours"][split] - len(audio) / 16000 / 3600) < 1e-3


@needs_espeak
def test_crash_midway_leaves_no_meta(tmp_path, monkeypatch):
    """A run into a complete folder (its meta.json there) that dies in synthesis leaves no meta.json behind."""
    (tmp_path / "meta.json").write_text("{}")

    def broken(pair):
        raise RuntimeError("espeak-ng died")
    monkeypatch.setattr(speech, "synthesize_pair", broken)
    with pytest.raises(RuntimeError, match="died"):
        speech.main([f"--out_dir={tmp_path}", "--n_train=2", "--n_val=1", "--n_test=1", "--n_text=2", "--workers=1"])
    assert not (tmp_path / "meta.json").exists()
