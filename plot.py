"""
plot.py: the figures of docs/, drawn from what the runs wrote. matplotlib is an optional extra
(pip install matplotlib); nothing else in the repo needs it.

    python plot.py lengths out-swan-rope/eval.json out-swan/eval.json ... --out=assets/swan.png
        val loss against context length, one line per eval.py JSON (eval.py --json_out=...)
    python plot.py blocks out-star-niah/eval.json --out=assets/star.png
        RULER score against Star Attention block size, one line per task and context length
    python plot.py rows rows.json --out=assets/rows.png
        decoding tokens/s against busy rows, eager and compiled (bench.py rows --json=rows.json)
    python plot.py rl out-rl out-rl-instruct --out=assets/rl.png
        rl.py runs (their log.jsonl): each environment's training reward against step (a moving mean
        over 5 steps), one line per run and environment
    python plot.py budget budget-32.json budget-64.json ... --out=assets/budget.png
        eval.py --tasks=chat --reasoning_budget=B --json_out=...: held-out accuracy (reasoning on) and
        the share of answers thinking within B, against B
    python plot.py tokens out-distilled out-scratch ... --out=assets/compression.png
        train.py runs: val loss against training tokens (steps x batch x block x accumulation)
    python plot.py asr out-asr/char out-asr/roman ... --out=assets/asr.png
        train_asr.py runs (their log.jsonl): training loss (per label, RNN-T + the CTC term, a moving mean
        over 50 steps) and val mixed error rate against step
    python plot.py pet out-asr-pet-lt out-asr-pet-lt2 ... --out=assets/pet_longtail.png
        train_asr.py out_dirs that each hold a 'char' and a 'char+pet' run (their results.json): plain
        against PET, a line per out_dir (seed), in test CER, rare characters' CER and the chain statistic
    python plot.py runs out-lowprec-bf16 out-lowprec-fp8 ... --out=lowprec.png
        train.py runs (their log.jsonl): prints each one's final val loss and its difference from the
        first run's; draws train loss and val loss relative to the first run against step
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
        for what, style in (("ruler", "-"), ("agreement", "--")):
            cells = {}  # (task, length) -> [(block / length, %)]; full attention plotted at 1
            for key, cell in r.get(what, {}).items():
                task, how, T = key.split("|")
                value = cell["score"] if what == "ruler" else cell
                if value is not None:
                    block = int(T) if how == "full" else int(how[len("star"):])
                    cells.setdefault((task, int(T)), []).append((block / int(T), value))
            for (task, T), points in sorted(cells.items()):
                points.sort()
                name = f"{task} @ {T}: " + ("RULER score" if what == "ruler" else "same answer as full")
                ax.plot([b for b, _ in points], [v for _, v in points], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Star Attention block size / context length (1 = full attention)")
    ax.set_ylabel("%")


def rows(ax, paths):
    for path in paths:
        r = read_json(path)
        for form in ("eager", "compiled"):
            points = sorted((int(n), v) for n, v in r[form].items())
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o",
                    label=f"{form} ({r['threads']} threads)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rows decoding together", ylabel="generated tokens/s")


def moving_mean(values, n):
    """The mean of each value and the n - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def rl(ax, out_dirs):
    for out_dir in out_dirs:
        path = os.path.join(out_dir, "log.jsonl")
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist (run rl.py --out_dir={out_dir} first)")
        records = [r for r in map(json.loads, open(path)) if "filtered" in r]
        envs = sorted({k for r in records for k, v in r.items() if isinstance(v, dict) and "reward" in v})
        for env in envs:
            points = [(r["step"], r[env]["reward"]) for r in records if env in r]
            mean = moving_mean([v for _, v in points], 5)  # over the last 5 steps that drew this environment
            ax.plot([s for s, _ in points], mean, label=f"{os.path.basename(os.path.normpath(out_dir))} {env}")
    ax.set(xlabel="RL step", ylabel="training reward (moving mean of 5)")


def budget(ax, paths):
    results = sorted((read_json(p) for p in paths), key=lambda r: r["reasoning_budget"] or 0)
    envs = list(results[0]["envs"])
    xs = [r["reasoning_budget"] for r in results]
    for env in envs:
        line, = ax.plot(xs, [r["envs"][env]["accuracy_on"] for r in results], marker="o", label=f"{env} accuracy")
        ax.plot(xs, [r["envs"][env].get("within_budget") for r in results], marker="x", ls="--",
                color=line.get_color(), label=f"{env} within budget")
    ax.set(xlabel="thinking budget B (tokens)", ylabel="held-out accuracy / share within B")


def asr(fig, run_dirs):
    ax_loss, ax_mer = fig.subplots(1, 2)
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "log.jsonl")
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist (run train_asr.py first)")
        records = [json.loads(line) for line in open(path)]
        mean = moving_mean([r["loss"] for r in records], 50)
        name = os.path.basename(os.path.normpath(run_dir))
        ax_loss.plot([r["step"] + 1 for r in records], mean, label=name, lw=1)
        scored = [(r["step"] + 1, r["val"]["mer"]) for r in records if "val" in r]
        ax_mer.plot(*zip(*scored), marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss per label (moving mean of 50)", yscale="log")
    ax_mer.set(xlabel="step", ylabel="val mixed error rate")
    ax_loss.legend(fontsize=8)
    return ax_mer


PET_METRICS = (("cer_zh", "test CER (Mandarin)"), ("cer_rare", "test CER, rare characters"),
               ("p_error_after_error", "P(error | previous wrong)"),
               ("p_error_after_homophone", "P(error | previous a homophone)"))


def pet(fig, out_dirs):
    pairs = []
    for out_dir in out_dirs:
        pairs.append([read_json(os.path.join(out_dir, run, "results.json"))["test"] for run in ("char", "char+pet")])
    metrics = [(k, t) for k, t in PET_METRICS if all(k in r for pair in pairs for r in pair)]  # what every run has
    axes = fig.subplots(1, len(metrics))
    for ax, (key, title) in zip(axes, metrics):
        for plain, composed in pairs:
            ax.plot([0, 1], [plain[key], composed[key]], color="grey", marker="o", alpha=0.6)
        mean = [sum(p[i][key] for p in pairs) / len(pairs) for i in (0, 1)]
        ax.plot([0, 1], mean, color="black", marker="s", lw=2, label=f"mean of {len(pairs)}")
        ax.set(xticks=[0, 1], xticklabels=["plain", "PET"], xlim=(-0.3, 1.3), title=title)
        ax.grid(alpha=0.3)
    return axes[0]


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


def tokens(ax, out_dirs):
    for out_dir in out_dirs:
        r = read_run(out_dir)
        c = r["config"]
        per_step = c["batch_size"] * c["block_size"] * c.get("gradient_accumulation_steps", 1)
        ax.plot([s * per_step / 1e6 for s, _ in r["val"]], [v for _, v in r["val"]], marker="o",
                label=os.path.basename(os.path.normpath(out_dir)))
    ax.set(xlabel="training tokens (millions)", ylabel="val loss", ylim=(None, 2.0))


def report(runs):
    """The table: final val loss of each run and its relative difference from the first run's."""
    names = list(runs)
    base = runs[names[0]]["val"][-1][1]
    print(f"{'run':<28}{'steps':>7}{'final val loss':>16}{'vs ' + names[0]:>24}")
    for name, r in runs.items():
        step, loss = r["val"][-1]
        print(f"{name:<28}{step:>7}{loss:>16.4f}{(loss - base) / base * 100:>+23.2f}%")


def runs(fig, out_dirs):
    """The table, and two panels: train loss, and val loss relative to the first run's (%)."""
    runs = {os.path.basename(os.path.normpath(d)): read_run(d) for d in out_dirs}
    if any(not r["val"] for r in runs.values()):
        sys.exit("error: a run has no val loss yet: " + ", ".join(n for n, r in runs.items() if not r["val"]))
    report(runs)
    if fig is None:
        return
    ax_train, ax_val = fig.subplots(1, 2)
    base = dict(next(iter(runs.values()))["val"])
    for name, r in runs.items():
        ax_train.plot(*zip(*r["train"]), label=name, lw=1)
        rel = [(s, (v - base[s]) / base[s] * 100) for s, v in r["val"] if s > 0 and s in base]  # step 0: untrained
        ax_val.plot(*zip(*rel), label=name, marker="o", lw=1)
    ax_train.set(xlabel="step", ylabel="train loss (logged steps)", ylim=(None, 3.0))
    ax_val.set(xlabel="step", ylabel=f"val loss vs {next(iter(runs))} (%)")
    return ax_val


def main():
    ap = argparse.ArgumentParser(description="draw the docs figures")
    ap.add_argument("kind", choices=["lengths", "blocks", "rows", "rl", "budget", "tokens", "runs", "asr", "pet"])
    ap.add_argument("inputs", nargs="+",
                    help="eval.py JSON files (lengths, blocks, budget), bench.py rows JSON (rows), "
                         "rl.py out_dirs (rl), train.py out_dirs (tokens, runs), train_asr.py run folders (asr), "
                         "train_asr.py out_dirs (pet)")
    ap.add_argument("--out", default=None, help="the PNG to write (runs: optional, the table prints anyway)")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    if args.kind == "runs" and args.out is None:
        runs(None, args.inputs)
        return
    if args.out is None:
        sys.exit(f"error: plot.py {args.kind} needs --out=FILE.png")
    plt = pyplot()
    if args.kind in ("runs", "asr", "pet"):
        fig = plt.figure(figsize=(13 if args.kind == "pet" else 11, 4))
        ax = {"runs": runs, "asr": asr, "pet": pet}[args.kind](fig, args.inputs)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        kinds = {"lengths": lengths, "blocks": blocks, "rows": rows, "rl": rl, "budget": budget, "tokens": tokens}
        kinds[args.kind](ax, args.inputs)
        ax.grid(alpha=0.3)
    if args.kind == "pet":  # its panels carry their own titles
        fig.suptitle(args.title)
    else:
        ax.set_title(args.title)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
