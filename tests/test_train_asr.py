"""
tests/test_train_asr.py: train_asr.py's scoring (the alignment against brute-force edit distance, MER,
the chain statistic), its flags and missing data, and the whole path on a tiny espeak-ng corpus:
prepare, Roman2Char, a few steps of each run kind, results.json, then asr.py --wav on a corpus file and
on bad files.
Run: python -m pytest -q tests/test_train_asr.py
"""
import itertools, json, os, shutil, subprocess, sys, wave

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def scoring():
    """train_asr.py's functions above its main block, without running it (it is a script)."""
    source = open(os.path.join(REPO, "train_asr.py")).read()
    scope = {"__file__": os.path.join(REPO, "train_asr.py"), "__name__": "scoring"}
    argv, sys.argv = sys.argv, ["train_asr.py"]
    try:
        exec(compile(source[:source.index("if __name__ == '__main__':")], "train_asr.py", "exec"), scope)
    finally:
        sys.argv = argv
    return scope


def edit_distance(a, b):
    """Levenshtein distance by brute force over every alignment: the fewest edits of any monotone pairing."""
    best = len(a) + len(b)
    for k in range(min(len(a), len(b)) + 1):
        for i in itertools.combinations(range(len(a)), k):
            for j in itertools.combinations(range(len(b)), k):
                subs = sum(a[p] != b[q] for p, q in zip(i, j))
                best = min(best, subs + (len(a) - k) + (len(b) - k))
    return best


def test_alignment_is_the_edit_distance():
    s = scoring()
    rng = np.random.default_rng(0)
    for _ in range(60):
        ref = list(rng.choice(list("abc"), rng.integers(0, 6)))
        hyp = list(rng.choice(list("abc"), rng.integers(0, 6)))
        got, edits = s["align"](ref, hyp)
        assert edits == edit_distance(ref, hyp)
        assert len(got) == len(ref) and sum(g != u for u, g in zip(ref, got)) <= edits
        rest = iter(hyp)  # the paired hypothesis units are a subsequence of the hypothesis
        assert all(any(g == h for h in rest) for g in got if g is not None)


def test_score_counts_units_and_chains():
    s = scoring()
    refs = [["我", "想", "吃", "green", "apple"], ["他", "是", "司", "机"]]
    hyps = [["我", "想", "吃", "green", "apple"], ["她", "事", "司", "机"]]
    r = s["score"](refs, hyps)
    assert r["units"] == 9 and r["mer"] == pytest.approx(2 / 9)
    assert r["cer_zh"] == pytest.approx(2 / 7) and r["wer_en"] == 0
    assert r["p_error"] == pytest.approx(2 / 9)
    assert r["p_error_after_error"] == pytest.approx(1 / 2)  # after 他 (wrong): 是 wrong; after 是: 司 right
    r = s["score"]([["a", "b", "c"]], [["a", "c"]])  # a deletion
    assert r["mer"] == pytest.approx(1 / 3) and r["p_error_after_error"] == 0 and "cer_rare" not in r
    seen = {"我": 100, "想": 100, "吃": 100, "他": 21, "是": 20, "机": 3}  # 司 never seen: rare too
    r = s["score"](refs, hyps, seen)
    assert r["rare_units"] == 3 and r["cer_rare"] == pytest.approx(1 / 3)  # 是 wrong; 司, 机 right
    assert r["p_error_after_rare"] == pytest.approx(0)  # after 是: 司 right; after 司: 机 right
    r = s["score"]([["是", "机"]], [["事", "鸡"]], seen)
    assert r["cer_rare"] == 1 and r["p_error_after_rare"] == 1
    readings = {"他": {"ta1"}, "她": {"ta1"}, "是": {"shi4"}, "事": {"shi4"}, "司": {"si1"}, "机": {"ji1"},
                "我": {"wo3"}, "想": {"xiang3"}, "吃": {"chi1"}}
    r = s["score"](refs, hyps, seen, readings)  # 他 -> 她 and 是 -> 事: homophones, 2 of the 7 characters
    assert r["homophones"] == pytest.approx(2 / 7) and r["homophone_errors"] == 2
    assert r["after_homophone_units"] == 2 and r["p_error_after_homophone"] == pytest.approx(1 / 2)  # 是 wrong, 司 not
    r = s["score"]([["是", "机", "司"]], [["我", "机"]], None, readings)  # another sound, then a deletion
    assert r["homophones"] == 0 and r["after_homophone_units"] == 0 and r["p_error_after_homophone"] == 0


def run(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_bad_flags_and_missing_data(tmp_path):
    out = run("train_asr.py", "--runs=char,bogus", f"--data_dir={tmp_path}")
    assert out.returncode == 2 and "unknown run 'bogus'" in out.stderr
    out = run("train_asr.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}")
    assert out.returncode == 1 and "python data/speech/prepare.py" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("train_asr.py", "--steps=0")
    assert out.returncode == 2 and "steps" in out.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny corpus, its Roman2Char, and three runs of a few steps each."""
    root = tmp_path_factory.mktemp("asr")
    data, r2c, out = root / "speech", root / "r2c", root / "out"
    steps = [("data/speech/prepare.py", f"--out_dir={data}", "--n_train=24", "--n_val=6", "--n_test=6",
              "--n_text=200", "--workers=1"),
             ("romanize.py", f"--data_dir={data}", f"--out_dir={r2c}", "--steps=20"),
             ("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=char,roman,char+pet", "--steps=3",
              "--batch_size=4", "--eval_every=0", f"--roman2char={r2c}/roman2char.pt", "--n_layers=1",
              "--d_model=32", "--n_heads=2", "--sub_channels=8", "--pred_dim=32", "--joint_dim=32")]
    for args in steps:
        proc = run(*args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return data, out, proc.stdout


@needs_espeak
def test_runs_write_results_and_the_table(trained):
    data, out, stdout = trained
    for name in ("char", "roman", "char+pet"):
        r = json.loads((out / name / "results.json").read_text())
        assert r["run"] == name and 0 <= r["test"]["mer"] and r["joint"]["mb"][0] > 0
        assert (out / name / "ckpt.pt").exists()
    char, roman = (json.loads((out / n / "results.json").read_text()) for n in ("char", "roman"))
    assert "mer_roman" in roman["test"] and "mer_roman" not in char["test"]
    assert "| char+pet |" in stdout


@needs_espeak
def test_finished_runs_are_not_replaced_unasked(trained):
    data, out, _ = trained
    before = (out / "char" / "ckpt.pt").stat().st_mtime_ns
    proc = run("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=roman,char")
    assert proc.returncode == 2 and "--overwrite=True" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "char" / "ckpt.pt").stat().st_mtime_ns == before


@needs_espeak
def test_rescore_scores_finished_runs_again_and_keeps_their_results(trained):
    """--rescore decodes the finished runs again (here with a beam search) without training into
    rescore_beam{k}.json, the scores its table prints; results.json keeps the training's own scores; a run
    that is not there exits 2 before any work."""
    data, out, _ = trained
    before = (out / "char" / "results.json").read_text()
    proc = run("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=char,roman", "--rescore=True",
               "--beam=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| char | " in proc.stdout and "| roman | " in proc.stdout
    assert (out / "char" / "results.json").read_text() == before
    for name in ("char", "roman"):
        scores = json.loads((out / name / "rescore_beam2.json").read_text())
        assert scores["run"] == name and scores["beam"] == 2
        mers = f"{scores['val']['mer']:.3f} | {scores['test']['mer']:.3f}"
        assert f"| {name} | {scores['vocab_size']} | - | - | {mers} |" in proc.stdout
    proc = run("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=roman+pet", "--rescore=True")
    assert proc.returncode == 2 and "holds no finished run" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=char", "--rescore=True",
               "--oracle=True")  # greedy with the reference as the prediction network's context
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads((out / "char" / "rescore_oracle.json").read_text())
    assert scores["oracle"] is True and scores["beam"] == 0 and 0 <= scores["test"]["mer"]
    for bad in (["--oracle=True"], ["--oracle=True", "--rescore=True", "--beam=2"]):
        proc = run("train_asr.py", f"--data_dir={data}", f"--out_dir={out}", "--runs=char", *bad)
        assert proc.returncode == 2 and "--oracle=True rescores" in proc.stderr and "Traceback" not in proc.stderr


@needs_espeak
def test_wav_transcribes_and_refuses_bad_files(trained, tmp_path):
    data, out, _ = trained
    with np.load(data / "test.npz") as z:
        samples = z["audio"][z["offsets"][0]:z["offsets"][1]]
    good = tmp_path / "good.wav"
    with wave.open(str(good), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(samples.tobytes())
    for name in ("char", "roman", "char+pet"):
        proc = run("asr.py", f"--wav={good}", f"--init_from={out / name}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("asr.py", f"--wav={good}", f"--init_from={out / 'char'}", "--beam=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("asr.py", f"--wav={good}", f"--init_from={out / 'char'}", "--beam=-1")
    assert proc.returncode == 1 and "--beam" in proc.stderr and "Traceback" not in proc.stderr
    stereo, slow, text = tmp_path / "stereo.wav", tmp_path / "slow.wav", tmp_path / "notes.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000), w.writeframes(np.zeros(200, "<i2").tobytes())
    with wave.open(str(slow), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(np.zeros(200, "<i2").tobytes())
    text.write_text("not audio")
    for path, message in ((stereo, "mono"), (slow, "16000 Hz"), (text, "not a WAV file"),
                          (tmp_path / "absent.wav", "No such file")):
        proc = run("asr.py", f"--wav={path}", f"--init_from={out / 'char'}")
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run("asr.py", f"--wav={good}", f"--init_from={tmp_path}")
    assert proc.returncode != 0 and "ckpt.pt not found" in proc.stderr
