"""
plot.py: compare train.py runs from their out_dir/log.jsonl. Read after train.py.
Prints each run's final val loss and its difference from the first run's, and with matplotlib
(an optional extra: pip install matplotlib) draws their loss curves into one PNG.

    python plot.py out-lowprec-bf16 out-lowprec-fp8 out-lowprec-nvfp4 --png=lowprec.png
    python plot.py out-lowprec-*          # shell order: out-lowprec-bf16 comes first
"""
import argparse
import json
import os
import sys


def read_run(out_dir):
    """{"train": [(step, loss)], "val": [(step, val loss)], "config": dict} from out_dir/log.jsonl;
    a resumed run appends to its log, so the last record of a step wins."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist (train with --out_dir={out_dir} first)")
    train, val, config = {}, {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "config" in r:
                config = r["config"]
            elif "val_loss" in r:
                val[r["step"]] = r["val_loss"]
            elif "loss" in r:
                train[r["step"]] = r["loss"]
    return {"train": sorted(train.items()), "val": sorted(val.items()), "config": config}


def report(runs):
    """The table: final val loss of each run and its relative difference from the first run's."""
    names = list(runs)
    base = runs[names[0]]["val"][-1][1]
    print(f"{'run':<28}{'steps':>7}{'final val loss':>16}{'vs ' + names[0]:>24}")
    for name, r in runs.items():
        step, loss = r["val"][-1]
        print(f"{name:<28}{step:>7}{loss:>16.4f}{(loss - base) / base * 100:>+23.2f}%")


def plot(runs, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the table above has the numbers")
        return
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    base = dict(next(iter(runs.values()))["val"])
    for name, r in runs.items():
        ax_train.plot(*zip(*r["train"]), label=name, lw=1)
        rel = [(s, (v - base[s]) / base[s] * 100) for s, v in r["val"] if s > 0 and s in base]  # step 0: untrained
        ax_val.plot(*zip(*rel), label=name, marker="o", lw=1)
    ax_train.set(xlabel="step", ylabel="train loss (logged steps)", ylim=(None, 3.0))
    ax_val.set(xlabel="step", ylabel=f"val loss vs {next(iter(runs))} (%)")
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main():
    parser = argparse.ArgumentParser(description="final val loss of train.py runs relative to the first, and loss curves")
    parser.add_argument("out_dirs", nargs="+", help="train.py out_dirs; the first is the baseline")
    parser.add_argument("--png", default=None, help="write the loss curves here (needs matplotlib)")
    args = parser.parse_args()
    runs = {os.path.basename(os.path.normpath(d)): read_run(d) for d in args.out_dirs}
    if any(not r["val"] for r in runs.values()):
        sys.exit("error: a run has no val loss yet: " + ", ".join(n for n, r in runs.items() if not r["val"]))
    report(runs)
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
