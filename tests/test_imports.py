"""
No module of ours shadows a package a user of this project may have installed. The repo root is on
sys.path for every script, pytest run and notebook opened here, so a top-level `kernels.py` made
`import transformers` fail inside the repo (transformers >= 5.25 imports the Hub's `kernels`
package at import time): every parity test and bench comparison broke on a fresh machine.

    python -m pytest -q tests/test_imports.py

Checked two ways: by name (our top-level modules against every installed distribution's import
names and the standard library's module names), and end to end (from the repo root, in a fresh
interpreter, transformers imports and builds a NemotronHForCausalLM, and `kernels` is the Hub's).
transformers is a test requirement: without it these tests fail, they do not skip.
"""
import importlib.metadata
import os
import subprocess
import sys

from helpers import REPO


def our_top_level_names():
    """What `import NAME` finds in the repo root: *.py files and folders holding Python files."""
    names = set()
    for entry in os.listdir(REPO):
        path = os.path.join(REPO, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith(".") and any(
                f.endswith(".py") for f in os.listdir(path)):
            names.add(entry)  # a namespace package (data/, config/, tests/): `import data` finds it
    return names


def shadowed(ours, installed):
    """ours ∩ installed, as {name: what it hides}; tests/ is pytest's, never imported by name."""
    return {name: installed[name] for name in sorted(ours - {"tests"}) if name in installed}


def installed_import_names():
    names = {name: f"distribution {', '.join(dists)}" for name, dists in
             importlib.metadata.packages_distributions().items()}
    names.update({name: "the standard library" for name in sys.stdlib_module_names if name not in names})
    return names


def test_no_module_of_ours_shadows_an_installed_package():
    hits = shadowed(our_top_level_names(), installed_import_names())
    assert not hits, f"top-level modules of ours hide installed ones, rename them: {hits}"


def test_the_check_catches_a_shadowing_module():
    """The check above finds the clash that broke CI: a top-level kernels.py beside an installed
    `kernels` distribution (installed with transformers >= 5.25, so it is here)."""
    installed = installed_import_names()
    assert "kernels" in installed, "the Hub's kernels package should come with transformers"
    assert shadowed(our_top_level_names() | {"kernels"}, installed) == {"kernels": installed["kernels"]}
    assert "triton_ops" not in installed and "triton_kernels" not in our_top_level_names()


def test_transformers_builds_nemotron_h_from_the_repo_root():
    """What a user does in a notebook opened here: the repo root first on sys.path (python -c puts
    the working directory there), transformers imported, a tiny NemotronH built and run."""
    code = (
        "import kernels, transformers, torch\n"
        "assert not kernels.__file__.startswith(%r), kernels.__file__\n"
        "cfg = transformers.NemotronHConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,\n"
        "    layers_block_type=['mamba', 'attention', 'mlp'], num_attention_heads=4, num_key_value_heads=2,\n"
        "    head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,\n"
        "    n_groups=1, chunk_size=8)\n"
        "model = transformers.NemotronHForCausalLM(cfg)\n"
        "print(tuple(model(torch.zeros(1, 5, dtype=torch.long)).logits.shape))\n"
    ) % REPO
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 5, 64)"


# -----------------------------------------------------------------------------
# our own imports point one way: the Triton file <- mixers <- model <- {generate, checkpoint} <- rollout <- scripts;
# parallel and lowprec are imported by the scripts, never by the model files; bench_kernels uses bench's helpers,
# planfit plan and its cost model (steptime)

LEVEL = {"triton_ops": 0, "hardware": 0, "configurator": 0, "data": 0, "expert_gemm": 0.5,
         "mamba": 1, "attention": 1, "moe": 1, "romanize": 1, "quantize": 1,
         "model": 2, "asr": 2,
         "generate": 3, "checkpoint": 3, "steptime": 3, "lowprec": 3, "parallel": 3, "minitron": 3,
         "rollout": 4, "distill": 4,
         "train": 5, "sample": 5, "serve": 5, "eval": 5, "rl": 5, "prune": 5, "bench": 5, "plan": 5, "plot": 5,
         "train_asr": 5,
         "bench_kernels": 6, "planfit": 6}
# imports inside a function, at call time: the public methods that stay on Nemotron and delegate,
# bench.py's main() running bench_kernels.py's benches (bench.py kernels, lowprec), plan.py's main()
# running planfit.py (--validate, --calibrate)
DELEGATIONS = {("model", "generate"), ("model", "checkpoint"), ("bench", "bench_kernels"), ("plan", "planfit")}


def our_imports(name):
    """{(imported module, at top level?)} of our modules that name.py imports."""
    import ast
    tree = ast.parse(open(os.path.join(REPO, f"{name}.py")).read())
    top = {id(n) for n in tree.body}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module]
        else:
            continue
        for m in mods:
            if m.split(".")[0] in LEVEL:
                found.add((m.split(".")[0], id(node) in top))
    return found


def test_imports_point_one_way():
    """Every file imports only files of a lower level (model.py's delegations, when called, aside);
    model.py, mamba.py and attention.py never import torch.distributed at the top level."""
    files = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}
    assert files <= set(LEVEL), f"a new file needs its level here: {sorted(files - set(LEVEL))}"
    wrong = [(name, dep) for name in sorted(files) for dep, top in our_imports(name)
             if dep != name and LEVEL[dep] >= LEVEL[name] and ((name, dep) not in DELEGATIONS or top)]
    assert not wrong, f"imports against the direction: {wrong}"
    for name in ("model", "mamba", "attention"):
        source = open(os.path.join(REPO, f"{name}.py")).read()
        assert "\nimport torch.distributed" not in source and "\nfrom torch.distributed" not in source, name
