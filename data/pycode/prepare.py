"""
data/pycode/prepare.py: the embedded default data set, built with no network from the Python standard
library's own source files on this machine, as byte-level tokens (vocab 256). Read data/tokenizer.py first.
Run: python data/pycode/prepare.py        (train.py calls prepare() itself on first use)

- Files: every *.py under sysconfig's "stdlib" path, sorted by relative path, skipping any path with a
  part named site-packages, test, tests or idle_test (installed packages and test suites).
- Separator: each file is preceded by a header line "# file: <relpath>\n". It is itself Python, and it
  tells the model (and a reader of val.bin) where one file ends and the next begins.
- Split by file, deterministic: a file goes to val when crc32(relpath) % 100 < 5 (about 5% of files).
- Size: the whole stdlib (~12 MB, ~730 files on CPython 3.11) takes about a second, so nothing is
  capped by default. prepare(max_train_bytes=N) takes train files in order, skipping any that would
  overflow N bytes (tests use it to stay fast); val is never capped, so val loss stays comparable.
The data set depends on the Python version; the stats at the bottom are from CPython 3.11.7 on Linux.
"""
import os, platform, sys, sysconfig, time, zlib
import numpy as np
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.tokenizer`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizer import ByteTokenizer, write_dataset

SKIP = {"site-packages", "test", "tests", "idle_test"}

# ----------------------------------------------------------------------------

def stdlib_files():
    """(relpath, absolute path) of the stdlib's .py files, sorted, with SKIP'ed parts left out."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP]  # don't even descend into them
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(found)

def is_val(relpath):
    return zlib.crc32(relpath.encode()) % 100 < 5

def prepare(out_dir=None, max_train_bytes=None):
    """Build data/pycode (or out_dir): train.bin, val.bin, meta.json. Returns the meta dict."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    t0 = time.time()
    chunks = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    for relpath, path in stdlib_files():
        split = "val" if is_val(relpath) else "train"
        with open(path, "rb") as f:
            data = f"# file: {relpath}\n".encode() + f.read()
        if split == "train" and max_train_bytes is not None and sizes["train"] + len(data) > max_train_bytes:
            continue
        chunks[split].append(data)
        sizes[split] += len(data)
    # raw bytes are the token ids: view as uint8, widen to the uint32 of the format
    train, val = (np.frombuffer(b"".join(chunks[s]), dtype=np.uint8) for s in ("train", "val"))
    meta = {**ByteTokenizer.meta, "source": "python stdlib", "python": platform.python_version(),
            "train_files": len(chunks["train"]), "val_files": len(chunks["val"])}
    meta = write_dataset(out_dir, train, val, meta)
    print(f"pycode: {meta['train_files']:,} train files, {meta['val_files']:,} val files (Python {meta['python']})")
    print(f"train: {meta['train_tokens']:,} tokens | val: {meta['val_tokens']:,} tokens | "
          f"{time.time() - t0:.1f} s -> {out_dir}")
    return meta

if __name__ == "__main__":
    prepare()

# expected output (CPython 3.11.7, Linux; uint32 files: 45 MB train.bin, 3.4 MB val.bin):
# pycode: 679 train files, 55 val files (Python 3.11.7)
# train: 11,280,381 tokens | val: 858,886 tokens | 0.2 s -> .../data/pycode
