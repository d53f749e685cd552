"""
data/shakespeare_char/prepare.py: tiny Shakespeare (~1.1 MB of plays) as character-level tokens, as in
nanoGPT. Read data/tokenizer.py first.
Run: python data/shakespeare_char/prepare.py [--input=FILE] [--out_dir=DIR]

Downloads Karpathy's char-rnn copy once into input.txt beside this file; --input=FILE reads a local
copy instead and needs no network. The vocabulary is the sorted set of characters in the text (65),
stored in meta.json as "chars". The first 90% of characters go to train, the last 10% to val.
"""
import argparse, os, sys, urllib.request
if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.tokenizer`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizer import CharTokenizer, write_dataset

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------

def download(url, path):
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)  # never a half-downloaded input.txt

def prepare(text, out_dir=HERE):
    """Character-level train.bin/val.bin/meta.json of text in out_dir; returns the meta dict."""
    tok = CharTokenizer(sorted(set(text)))
    ids = tok.encode(text)
    n = int(0.9 * len(ids))
    meta = write_dataset(out_dir, ids[:n], ids[n:], tok.meta)
    print(f"{len(text):,} characters, vocab {tok.vocab_size}: {''.join(tok.itos)!r}")
    print(f"train: {meta['train_tokens']:,} tokens | val: {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a local copy of the text (no download)")
    parser.add_argument("--out_dir", default=HERE, help="where to write train.bin, val.bin, meta.json")
    parser.add_argument("--url", default=URL, help="where to download the text from")
    args = parser.parse_args(argv)
    path = args.input or os.path.join(args.out_dir, "input.txt")
    if not args.input and not os.path.exists(path):
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            download(args.url, path)
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            sys.exit(f"error: could not download {args.url}: {getattr(e, 'reason', None) or e}\n"
                     f"offline? pass a local copy of the text: --input=FILE")
    if not os.path.isfile(path):
        sys.exit(f"error: input file {path} not found")
    with open(path, encoding="utf-8") as f:
        prepare(f.read(), args.out_dir)

if __name__ == "__main__":
    main()

# expected output:
# 1,115,394 characters, vocab 65: "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# train: 1,003,854 tokens | val: 111,540 tokens -> .../data/shakespeare_char
