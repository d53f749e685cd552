"""
Smoke test of bench.py's and bench_kernels.py's functions at tiny sizes: they run, return what the
reports print, and the transformers candidate really has our weights. No timing is asserted (benchmarks
are not tests). The decode tests compile the static-cache engine's step for a few tiny buckets (up to
~40 s on 2 CPU cores).

    python -m pytest -q tests/test_bench.py
"""
import re
import sys

import torch

import bench
import bench_kernels
import generate
from helpers import assert_close
from model import NemotronConfig

CFG = NemotronConfig(**bench.QUICK)


def test_attention_only_keeps_mlp_and_moe():
    assert bench.attention_only(NemotronConfig(**bench.DEFAULT)).pattern == "*-***-*E"
    assert bench.attention_only(CFG).d_model == CFG.d_model


def test_bench_train_and_report(capsys):
    res = bench.bench_train(CFG, batch_size=2, seq_len=16, steps=1, warmup=0)
    assert {"ours hybrid", "ours attention-only"} <= set(res)
    assert all(r["tok/s"] > 0 and r["params"] > 0 for r in res.values())
    bench.report_train(res, CFG, batch_size=2, seq_len=16, steps=1, warmup=0)
    out = capsys.readouterr().out
    assert "ours hybrid" in out and "*-***-*E" in out


NUM = r"[\d,]+\.\d+"  # a printed number


def test_bench_decode_and_report(capsys):
    """Every candidate decodes, the static-cache engine eager and compiled (one bucket: contexts
    16 and 40 both fit 64 positions); the report prints their columns, ratios and the matmul floor."""
    models = bench.candidates(CFG)
    res = bench.bench_decode(CFG, contexts=(16, 40), steps=2, warmup=1, models=models)
    assert list(res) == [16, 40]
    assert set(res[16]) == {"ours hybrid", "ours attention-only", "transformers", "ours static (eager)",
                            "ours compiled", "ours compiled, py wrap"}
    assert generate.CPU_COMPILE == {"cpp_wrapper": True}  # restored after each of the Python wrapper's tokens
    wrappers = {key[2] for key in models["ours hybrid"]._decode_steps}  # one compiled step each way
    assert wrappers == {(("cpp_wrapper", True),), (("cpp_wrapper", False),)}
    assert all(r["ms"] > 0 and r["prefill_s"] > 0 for by_name in res.values() for r in by_name.values())
    floor = bench.matmul_floor(models["ours hybrid"], reps=3)
    assert floor > 0
    bench.report_decode(res, steps=2, warmup=1, floor=floor)
    out = capsys.readouterr().out
    assert "ms/token at 40 / at 16" in out
    assert re.search(rf"transformers / ours compiled ms/token: {NUM}x at worst \(target >= 3.0x", out), out
    assert re.search(rf"matmul floor ms/token: {NUM}; ours compiled / floor: {NUM}x at 16 \(target <= 2.0x", out), out
    assert re.search(rf"Python wrapper / with its C\+\+ wrapper: {NUM}x to {NUM}x", out), out


def test_bench_batch_and_report(capsys):
    """Batched greedy decoding of prompts of mixed lengths: ours compiled and eager, transformers'
    generate() on the left-padded batch; each reports tokens/s and how many rows agree with ours."""
    models = bench.candidates(CFG)
    res = bench.bench_batch(models, n_prompts=3, lengths=(4, 12), new_tokens=4, rounds=1)
    assert set(res) == {"ours compiled", "ours static (eager)", "transformers"}
    assert all(r["tok/s"] > 0 and 0 <= r["same"] <= 3 for r in res.values())
    bench.report_batch(res, n_prompts=3, lengths=(4, 12), new_tokens=4, rounds=1)
    out = capsys.readouterr().out
    for name in res:
        assert re.search(rf"{re.escape(name)} +{NUM} tok/s", out), out
    assert re.search(rf"ours compiled / transformers tok/s: {NUM}x \(target >= 4.0x", out), out


def test_bench_serve_and_report(capsys):
    """A real serve.py process: every client completes, concurrent and one by one; the report's lines."""
    kw = dict(clients=3, max_tokens=4, lengths=(4, 8))
    res = bench.bench_serve(CFG, **kw)
    assert [res[m]["complete"] for m in ("concurrent", "sequential")] == [3, 3]
    bench.report_serve(res, compile=False, **kw)
    out = capsys.readouterr().out
    assert re.search(r"concurrent +[\d,.]+ tok/s  3/3 complete  time to first token p50 [\d.]+ s", out)
    assert re.search(r"concurrent / one by one tok/s: [\d.]+x \(target >= 3.0x: (PASS|FAIL)\)", out)


def test_transformers_candidate_has_our_weights():
    models = bench.candidates(CFG)
    assert "transformers" in models, "transformers is a test requirement (requirements-dev.txt)"
    ours, theirs = models["ours hybrid"].eval(), models["transformers"].eval()
    x = torch.randint(0, CFG.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(input_ids=x).logits, atol=1e-4, rtol=1e-4)
        # and the decoding loops agree token for token
        a = torch.cat(list(bench.stream(ours, x, 5)), dim=1)
        b = torch.cat(list(bench.stream(theirs, x, 5)), dim=1)
    assert torch.equal(a, b)


def test_main_quick(monkeypatch, capsys):
    """Smoke test of bench.py decode --quick --no_hf: the decode table with the engine's columns,
    the matmul floor and the batched section print numbers (no transformers columns)."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "decode", "--quick", "--no_hf"])
    bench.main()
    out = capsys.readouterr().out
    assert "decode" in out and "target <= 1.3" in out
    assert re.search(r"ours static \(eager\) +ours compiled +ours compiled, py wrap\n", out), out
    assert re.search(rf"\n +128( +{NUM} \( +{NUM}s\)){{5}}\n", out), out  # 5 candidates at context 128
    assert re.search(rf"matmul floor ms/token: {NUM}; ours compiled / floor: {NUM}x at 64 \(target <= 2.0x", out), out
    assert "== batched decoding: 4 greedy prompts" in out
    assert re.search(rf"ours compiled +{NUM} tok/s", out) and re.search(rf"ours static \(eager\) +{NUM} tok/s", out)
    assert "transformers/compiled" not in out and "transformers skipped or failed: no peer" in out


def test_batch_quick(monkeypatch, capsys):
    """bench.py batch --quick --no_hf: the batched section alone, then the prefill three ways."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "batch", "--quick", "--no_hf"])
    bench.main()
    out = capsys.readouterr().out
    assert "== batched decoding: 4 greedy prompts" in out and "ms/token" not in out  # no decode table
    for form in ("one by one", "padded batch", "one packed sequence"):
        assert len(re.findall(rf"{form} +{NUM} ms", out)) == 2, out


def test_decode_models_side_by_side(monkeypatch, capsys, tmp_path):
    """bench.py decode --init_from=A,B --quick: each model's greedy tok/s and its ratio to the first."""
    import numpy as np
    from model import Nemotron
    for name, d in (("a", 32), ("b", 16)):
        Nemotron(NemotronConfig(**{**bench.QUICK, "d_model": d})).save_pretrained(str(tmp_path / name))
    np.random.default_rng(0).integers(0, 64, 4096).astype(np.uint32).tofile(tmp_path / "val.bin")  # the prompts
    monkeypatch.setattr(sys, "argv", ["bench.py", "decode", "--quick", f"--init_from={tmp_path / 'a'},{tmp_path / 'b'}",
                                      f"--dataset={tmp_path}"])
    bench.main()
    out = capsys.readouterr().out
    assert re.search(rf"/a +[\d,]+ params +{NUM} tok/s  1\.00x", out)
    assert re.search(rf"/b +[\d,]+ params +{NUM} tok/s", out)


def test_kernels_quick(monkeypatch, capsys):
    """bench.py kernels --quick: the reference SSD timed (the Triton one too on a GPU or under the
    interpreter), the table printed."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "kernels", "--quick"])
    bench.main()
    out = capsys.readouterr().out
    assert "chunked SSD" in out and "reference" in out


def test_rnnt_quick(monkeypatch, capsys):
    """bench.py rnnt --quick: the RNN-T loss timed through the kernel path and the reference (on a CPU
    without the interpreter both are the reference); the joint's memory table on a GPU only."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "rnnt", "--quick"])
    bench.main()
    out = capsys.readouterr().out
    assert "Triton kernel" in out and "PyTorch reference" in out and "reference / kernel" in out
    assert ("whole logits" in out) == torch.cuda.is_available()


def test_bench_speculative_and_report(capsys):
    """Plain vs speculative greedy decoding of an (untrained) MTP model: both produce every token."""
    torch.manual_seed(0)
    model = bench.Nemotron(NemotronConfig(**{**bench.QUICK, "mtp_depth": 1, "mtp_share": True}))
    prompts = [torch.randint(0, 256, (1, 8)) for _ in range(2)]
    res = bench.bench_speculative(model, prompts, max_new_tokens=6, k=2, rounds=1)
    assert res["plain"] > 0 and res["speculative"] > 0 and res["stats"]["rounds"] >= 3
    bench.report_speculative(res, 2, 2, 6)
    assert "tokens per verification" in capsys.readouterr().out
MOE_KW = {**bench.MOE, "d_model": 32, "moe_d_ff": 16, "shared_d_ff": 32}


def test_bench_moe_and_report(capsys):
    res = bench.bench_moe(n_experts=(8,), tokens=32, steps=1, warmup=0, hf=False, cfg_kw=MOE_KW)
    assert set(res[8]) == {"ours: grouped GEMM", "ours: per-expert loop", "dense matmuls, same FLOPs"}
    assert all(r["tok/s"] > 0 and r["ms"] > 0 for r in res[8].values())
    bench.report_moe(res, tokens=32, steps=1, warmup=0, cfg_kw=MOE_KW)
    out = capsys.readouterr().out
    assert "ours grouped / ours loop" in out and "no peer" in out


def test_moe_candidates_compute_the_same_layer():
    """ours (grouped GEMMs), ours with the expert loop and transformers' NemotronHMoE (each experts
    implementation) give the same output on the same input: the same weights, the same routing."""
    layers = bench.moe_candidates(NemotronConfig(**{**MOE_KW, "n_experts": 8}))
    u = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ys = {name: layer.eval()(u) for name, layer in layers.items() if layer is not None}
    # ours twice, transformers' eager experts, and the implementation its from_pretrained picks
    # (grouped_mm with torch >= 2.9): a peer missing here would leave the bench's table unchecked
    assert {"ours: grouped GEMM", "ours: per-expert loop", "transformers: eager"} <= set(ys), set(ys)
    for name, y in ys.items():
        assert_close(y, ys["ours: grouped GEMM"], name, atol=1e-5, rtol=1e-5)


def test_main_moe_quick(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "moe", "--quick", "--no_hf"])
    bench.main()
    out = capsys.readouterr().out
    assert "== moe" in out and "E=16: ours grouped / ours loop" in out


def test_bench_star_and_report(capsys):
    cfg_kw = {**bench.STAR, **bench.QUICK, "pattern": "**-*E"}
    res = bench.bench_star(contexts=(32, 64), n_blocks=4, steps=1, warmup=0, cfg_kw=cfg_kw)
    assert list(res) == [32, 64] and all(t > 0 for r in res.values() for t in r.values())
    bench.report_star(res, 4, steps=1, warmup=0, cfg_kw=cfg_kw)
    win = bench.bench_window(contexts=(40, 64), window=8, steps=1, warmup=0)
    assert list(win) == [40, 64] and all(t > 0 for r in win.values() for t in r.values())
    bench.report_window(win, 8)
    out = capsys.readouterr().out
    assert "one host" in out and "dense/banded" in out


def test_bench_lowprec_and_report(capsys):
    lin = bench_kernels.bench_lowprec_linear(32, 32, 48, steps=1, warmup=0)
    assert set(lin) == {"bf16", "fp8", "mxfp8", "nvfp4"} and all(t > 0 for t in lin.values())
    quant = bench_kernels.bench_quantizers(16, 64, reps=1)
    assert all(t > 0 and nbytes > 0 for t, nbytes in quant.values())
    bench_kernels.report_lowprec(lin, (32, 32, 48), quant, (16, 64))
    out = capsys.readouterr().out
    assert "bf16 / recipe" in out and "nvfp4 16x16" in out
