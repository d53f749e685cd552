"""
Tests for configurator.py: each runs a tiny script that defines config globals, exec's the repo's
configurator.py and prints the resolved values as JSON, in a subprocess (configurator exits on errors).
Run: python -m pytest -q tests/test_configurator.py
"""
import json, os, subprocess, sys
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = f"""
import json, os, sys
batch_size = 16
learning_rate = 6e-4
compile = False
dtype = "bfloat16"
init_from = None
betas = (0.9, 0.95)
_private = 1
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join({REPO!r}, "configurator.py")).read())
print("CONFIG " + json.dumps({{k: globals()[k] for k in config_keys}}))
"""

@pytest.fixture
def run(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    def run(*args, env=None):
        p = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, **(env or {})}, timeout=30)
        lines = [l for l in p.stdout.splitlines() if l.startswith("CONFIG ")]
        config = json.loads(lines[0][len("CONFIG "):]) if lines else None
        return p, config
    return run

# ----------------------------------------------------------------------------

def test_defaults_and_overrides(run):
    p, c = run()
    assert p.returncode == 0 and c["batch_size"] == 16 and c["init_from"] is None
    p, c = run("--batch_size=32", "--dtype=float32", "--betas=(0.9, 0.99)", "--init_from=out/run1")
    assert p.returncode == 0, p.stderr
    assert c["batch_size"] == 32 and c["dtype"] == "float32" and c["betas"] == [0.9, 0.99]
    assert c["init_from"] == "out/run1"  # not a Python literal, and a None default takes a string
    assert "Overriding: batch_size = 32" in p.stdout

def test_int_promotes_to_float_but_not_back(run):
    p, c = run("--learning_rate=1")
    assert p.returncode == 0 and c["learning_rate"] == 1.0 and isinstance(c["learning_rate"], float)
    p, _ = run("--batch_size=1.5")
    assert p.returncode == 2 and "batch_size" in p.stderr

def test_bare_flag_sets_bool(run):
    p, c = run("--compile")
    assert p.returncode == 0 and c["compile"] is True
    p, c = run("--compile", "--compile=False")  # later arguments win
    assert c["compile"] is False
    p, _ = run("--batch_size")
    assert p.returncode == 2 and "batch_size" in p.stderr

def test_str_default_keeps_raw_text(run):
    p, c = run("--dtype=2024")
    assert p.returncode == 0 and c["dtype"] == "2024"
    p, c = run("--dtype='float16'")  # a string literal is still unquoted
    assert p.returncode == 0 and c["dtype"] == "float16"

def test_unknown_key_names_close_match(run):
    p, _ = run("--batch_sise=8")
    assert p.returncode == 2
    assert "batch_sise" in p.stderr and "batch_size" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr

def test_private_names_are_not_keys(run):
    p, _ = run("--_private=2")
    assert p.returncode == 2

def test_wrong_type(run):
    for arg in ("--batch_size=abc", "--compile=1", "--learning_rate=True", "--betas=[1, 2]"):
        p, _ = run(arg)
        assert p.returncode == 2, arg
        assert arg[2:].split("=")[0] in p.stderr and "Traceback" not in p.stderr

def test_literal_eval_never_evaluates(run, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').mkdir({str(marker)!r})"
    p, c = run(f"--dtype={code}")  # str default: stays the raw text
    assert p.returncode == 0 and c["dtype"] == code
    p, c = run(f"--init_from={code}")  # None default: not a literal, so a string
    assert p.returncode == 0 and c["init_from"] == code
    p, _ = run(f"--batch_size={code}")
    assert p.returncode == 2
    assert not marker.exists()

def test_config_file(run, tmp_path):
    (tmp_path / "cfg.py").write_text("import math\nbatch_size = 4\nlearning_rate = math.pi\n_tmp = 3\n")
    p, c = run("cfg.py", "--batch_size=8")
    assert p.returncode == 0, p.stderr
    assert c["batch_size"] == 8 and c["learning_rate"] == pytest.approx(3.14159, abs=1e-4)
    (tmp_path / "bad.py").write_text("batch_sise = 4\n")
    p, _ = run("bad.py")
    assert p.returncode == 2 and "batch_sise" in p.stderr and "batch_size" in p.stderr
    (tmp_path / "badtype.py").write_text("compile = 'yes'\n")
    p, _ = run("badtype.py")
    assert p.returncode == 2 and "compile" in p.stderr

def test_missing_config_file(run):
    p, _ = run("config/nope.py")
    assert p.returncode == 2 and "config/nope.py" in p.stderr and "Traceback" not in p.stderr

def test_help_lists_keys(run):
    p, c = run("--batch_size=3", "--help")
    assert p.returncode == 0 and c is None
    assert "--batch_size=3" in p.stdout and "--init_from=None" in p.stdout

def test_prints_only_on_rank_zero(run):
    p, c = run("--batch_size=32", env={"RANK": "1"})
    assert c["batch_size"] == 32 and "Overriding" not in p.stdout
    p, _ = run("--batch_size=32", env={"RANK": "0"})
    assert "Overriding" in p.stdout
