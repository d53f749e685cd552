"""
plot.py: the README's figures, drawn from what the runs wrote. matplotlib is an optional extra
(pip install matplotlib); nothing else in the repo needs it.

    python plot.py lengths out-swan-rope/eval.json out-swan/eval.json ... --out=assets/swan.png
        val loss against context length, one line per eval.py JSON (eval.py --json_out=...)
    python plot.py blocks out-star-niah/eval.json --out=assets/star.png
        RULER score against Star Attention block size, one line per task and context length
    python plot.py curves out-a out-b ... --out=assets/curves.png
        val loss against step, one line per train.py out_dir (its log.jsonl)
"""
import argparse
import json
import os
import sys


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plot.py draws with matplotlib, an optional extra: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {path}: {e}")


def label_of(path, r):
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    return f"{name} ({r['pattern']}{', swan ' + str(r['swan_train_len']) if r['swan_train_len'] else ''})"


def lengths(ax, paths):
    for path in paths:
        r = read_json(path)
        points = sorted((int(T), v) for T, v in r["loss"].items() if v is not None)
        ax.plot([T for T, _ in points], [v for _, v in points], marker="o", label=label_of(path, r))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("val loss")


def blocks(ax, paths):
    for path in paths:
        r = read_json(path)
        cells = {}  # (task, length) -> [(block, score)]; full attention plotted as block = length
        for key, cell in r["ruler"].items():
            task, how, T = key.split("|")
            if cell["score"] is not None:
                block = int(T) if how == "full" else int(how[len("star"):])
                cells.setdefault((task, int(T)), []).append((block / int(T), cell["score"]))
        for (task, T), points in sorted(cells.items()):
            points.sort()
            ax.plot([b for b, _ in points], [s for _, s in points], marker="o", label=f"{task} @ {T}")
    ax.set_xlabel("Star Attention block size / context length (1 = full attention)")
    ax.set_ylabel("RULER score")


def curves(ax, out_dirs):
    for d in out_dirs:
        rows = []
        try:
            with open(os.path.join(d, "log.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read {d}/log.jsonl: {e}")
        points = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=os.path.basename(d.rstrip("/")))
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")


def main():
    ap = argparse.ArgumentParser(description="draw the README's figures")
    ap.add_argument("kind", choices=["lengths", "blocks", "curves"])
    ap.add_argument("inputs", nargs="+", help="eval.py JSON files (lengths, blocks) or out_dirs (curves)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    {"lengths": lengths, "blocks": blocks, "curves": curves}[args.kind](ax, args.inputs)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
