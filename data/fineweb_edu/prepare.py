"""
data/fineweb_edu/prepare.py: a sample of FineWeb-Edu (Penedo et al. 2024, arXiv:2406.17557; educational
web pages) as tiktoken BPE tokens, for users with network access. Read data/tokenizer.py first.
Run: python data/fineweb_edu/prepare.py [--encoding=gpt2|o200k_base] [--num_docs=10000] [--input=PATH]

- Source: the first num_docs rows of the "sample-10BT" subset, through the Hugging Face dataset viewer's
  /rows API: plain JSON over urllib, 100 rows a request, so neither `datasets` nor pyarrow is needed.
  Offline, --input=PATH reads local documents instead: a .jsonl file ({"text": ...} per line), a folder
  of .txt files (one document each) or a single text file (one document). tiktoken still needs its
  vocabulary, which it downloads on first use and caches (TIKTOKEN_CACHE_DIR).
- Tokens: every document is preceded by the end-of-text token, so a document always starts after one
  (and sampling from eot starts a fresh document).
- Split: the last ~1% of tokens go to val, the cut moved forward to the next document start, so no
  document is split between train and val (a single document is cut where it falls).
"""
import argparse, json, os, sys, time, urllib.error, urllib.request
import numpy as np
from tqdm import tqdm
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.tokenizer`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizer import DataError, TiktokenTokenizer, tiktoken_encoding, write_dataset

ROWS_URL = ("https://datasets-server.huggingface.co/rows"
            "?dataset=HuggingFaceFW/fineweb-edu&config=sample-10BT&split=train")
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------
# documents in

def download_documents(num_docs, url=ROWS_URL):
    docs = []
    for offset in tqdm(range(0, num_docs, 100), desc="downloading", unit="x100 docs"):
        page = f"{url}&offset={offset}&length={min(100, num_docs - offset)}"  # 100 rows at most
        for attempt in range(4):  # the API rate-limits bursts: back off and retry a few times
            try:
                with urllib.request.urlopen(page, timeout=60) as r:
                    rows = json.load(r)["rows"]
                break
            except urllib.error.HTTPError as e:
                if e.code not in (429, 500, 502, 503) or attempt == 3:
                    raise
                time.sleep(2 ** attempt)
        # the viewer truncates very long cells; a truncated document is dropped rather than cut short
        docs += [row["row"]["text"] for row in rows if "text" not in row.get("truncated_cells", [])]
    return docs

def read_documents(path):
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        if not names:
            raise DataError(f"no .txt files in {path}")
        paths = [os.path.join(path, n) for n in names]
    elif os.path.isfile(path):
        paths = [os.fspath(path)]
    else:
        raise DataError(f"input {path} not found")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            if p.endswith(".jsonl"):
                docs += [json.loads(line)["text"] for line in f if line.strip()]
            else:
                docs.append(f.read())
    return docs

# ----------------------------------------------------------------------------
# tokens out

def prepare(docs, tok, out_dir=HERE, val_fraction=0.01):
    """Tokenize docs with tok (eot before each) into out_dir's train.bin/val.bin/meta.json; returns the meta."""
    if tok.eot is None:
        raise DataError("the tokenizer has no end-of-text token to separate documents")
    parts = [np.array([tok.eot] + tok.encode(doc), dtype=np.uint32)
             for doc in tqdm(docs, desc="tokenizing", unit="doc")]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    cut = int(len(tokens) * (1 - val_fraction))
    starts = np.flatnonzero(tokens[cut:] == tok.eot)  # the next document start at or after the cut
    cut += int(starts[0]) if len(starts) else 0
    if not 0 < cut < len(tokens):
        raise DataError(f"{len(docs)} documents, {len(tokens)} tokens: too few to split into train and val")
    meta = write_dataset(out_dir, tokens[:cut], tokens[cut:], {**tok.meta, "documents": len(docs), "eot": tok.eot})
    print(f"{len(docs):,} documents, encoding {meta.get('encoding')}, vocab {meta['vocab_size']:,}")
    print(f"train: {meta['train_tokens']:,} tokens | val: {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoding", default="gpt2", help="a tiktoken encoding: gpt2, o200k_base, ...")
    parser.add_argument("--input", help="local documents: a .jsonl file, a folder of .txt files, a text file")
    parser.add_argument("--num_docs", type=int, default=10_000, help="documents to download")
    parser.add_argument("--out_dir", default=HERE, help="where to write train.bin, val.bin, meta.json")
    parser.add_argument("--url", default=ROWS_URL, help="the /rows API URL, without offset and length")
    args = parser.parse_args(argv)
    try:
        tok = TiktokenTokenizer(tiktoken_encoding(args.encoding))  # first, to fail before a long download
        if args.input:
            docs = read_documents(args.input)
        else:
            try:
                docs = download_documents(args.num_docs, args.url)
            except (OSError, ValueError, KeyError) as e:  # network errors, or an answer that is not rows
                raise DataError(f"could not download documents from {args.url}: {type(e).__name__}: {e}\n"
                                f"offline? pass local documents: --input=PATH") from None
        prepare(docs, tok, args.out_dir)
    except DataError as e:
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()

# expected output: the format below; a real download's numbers are still to be measured on a machine
# with network access (this file was written offline and tested with --input only)
# 10,000 documents, encoding gpt2, vocab 50,257
# train: N tokens | val: M tokens -> .../data/fineweb_edu
