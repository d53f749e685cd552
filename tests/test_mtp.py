"""
Multi-token prediction and self-speculative decoding (model.py): the MTP losses against a direct
computation, the Mamba/attention rollback against decoding the kept tokens one by one, greedy
speculative output equal to plain greedy output token for token, each round's draft logits equal to
the depths run over the whole committed sequence, rejection sampling that keeps the verifier's
distribution, the mtp.* layout of Hugging Face folders, and the train.py / sample.py flags.

    python -m pytest -q tests/test_mtp.py
"""
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, run_script
import generate as generate_module
from generate import MambaCache, accept, new_cache, rollback, speculative_stream
from model import Nemotron, NemotronConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=64, pattern="M*M-E", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
            mamba_head_dim=32, mamba_groups=1, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)


def tiny(**kw):
    torch.manual_seed(0)
    return Nemotron(NemotronConfig(**{**TINY, **kw}))


def test_mtp_loss_is_each_depth_shifted():
    """Depth k reads h^{k-1}_i and Emb(idx[i+k]) and is scored on targets[i+k]; the training loss is
    main + lambda * mean(depths), the eval loss the main model's alone; every MTP weight gets a gradient."""
    model = tiny(mtp_depth=2, mtp_loss_weight=0.5)
    x = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    idx, targets = x[:, :-1], x[:, 1:]
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    h = model.hidden(idx)
    main = F.cross_entropy(model.lm_head(h).flatten(0, 1), targets.flatten())
    depths = []
    for k in (1, 2):
        h = model.mtp[k - 1](h[:, :20 - k], model.backbone.embeddings(idx[:, k:]))
        depths.append(F.cross_entropy(model.lm_head(h).flatten(0, 1), targets[:, k:].flatten()))
    assert_close(torch.stack(model.mtp_losses), torch.stack(depths), "depth losses", atol=1e-5)
    assert_close(loss, main + 0.5 * (depths[0] + depths[1]) / 2, "training loss", atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("mtp.") and "experts" not in n)
    model.eval()
    assert_close(model(idx, targets)[1], main, "eval loss", atol=1e-5)


def test_shared_depths_have_one_weight_set():
    shared, own = tiny(mtp_depth=3, mtp_share=True), tiny(mtp_depth=3)
    assert len(shared.mtp) == 1 and len(own.mtp) == 3
    assert shared.mtp_depth_module(3) is shared.mtp[0] and own.mtp_depth_module(3) is own.mtp[2]
    per_set = sum(p.numel() for p in own.mtp[0].parameters())
    assert own.num_params() - shared.num_params() == 2 * per_set
    assert shared.flops_per_token(64) == own.flops_per_token(64)  # the same compute per token


@torch.no_grad()
@pytest.mark.parametrize("j", [0, 1, 3])
def test_rollback_resumes_as_if_only_kept_tokens_were_read(j):
    """Read 4 tokens with every state kept, roll back to the j-th, read one more: the same logits
    as reading the first j+1 tokens one at a time (Mamba conv and SSM states, attention caches)."""
    model = tiny().eval()
    g = torch.Generator().manual_seed(2)
    prompt, new, last = (torch.randint(0, 256, s, generator=g) for s in ((1, 9), (1, 4), (1, 1)))
    a = new_cache(model, 1, 32)
    model.hidden(prompt, a)
    for c in a:
        if isinstance(c, MambaCache):
            c.keep_states = True
    model.hidden(new, a)
    rollback(a, 4, j)
    b = new_cache(model, 1, 32)
    model.hidden(prompt, b)
    for t in range(j + 1):
        model.hidden(new[:, t:t + 1], b)
    assert_close(model.hidden(last, a), model.hidden(last, b), "hidden after rollback", atol=1e-5)


def binary_head(model):
    """Make the LM head choose between tokens 1 and 2 by the sign of v.h: the MTP drafts then agree
    with the verifier about half the time, so rounds keep 0 .. k drafts."""
    with torch.no_grad():
        v = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(3))
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[1], model.lm_head.weight[2] = v, -v
    return model


@pytest.mark.parametrize("share,ks", [(True, (1, 2, 3, 4)), (False, (1, 2))])
def test_greedy_speculative_equals_greedy(share, ks):
    model = binary_head(tiny(mtp_depth=2, mtp_share=share)).eval()
    partial = 0
    for seed in range(3):
        prompt = torch.randint(0, 256, (1, 3 + 5 * seed), generator=torch.Generator().manual_seed(seed))
        plain = model.generate(prompt, 24, temperature=0)
        for k in ks:
            stats = {}
            spec = torch.cat([prompt, *speculative_stream(model, prompt, 24, k, temperature=0, stats=stats)], 1)
            assert torch.equal(spec, plain), (seed, k)
            assert model.generate(prompt, 24, temperature=0, speculative=k).equal(plain)
            partial += 0 < stats["accepted"][0] and stats["accepted"][-1] < stats["rounds"]
    assert partial > 0, "no run kept some drafts and dropped others: the rollback went untested"


@torch.no_grad()
@pytest.mark.parametrize("k,pattern", [(2, "*E"), (3, "*-"), (2, "-")])
def test_drafts_equal_the_depths_over_the_whole_sequence(k, pattern, monkeypatch):
    """Each round's drafts, from MTP caches that keep the entries of accepted drafts and recompute
    the rest (or from the last position alone, for depths without attention), equal the depths run
    from scratch over everything committed (as in training)."""
    model = binary_head(tiny(mtp_depth=k, mtp_pattern=pattern)).eval()
    logits = []  # greedy: pick(q, 0) sees each draft's logits q and takes their argmax
    monkeypatch.setattr(generate_module, "pick", lambda q, t: logits.append(q) or q.argmax(-1, keepdim=True))
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    stats = {}
    seq = torch.cat([prompt, *speculative_stream(model, prompt, 40, k, temperature=0, stats=stats)], 1)
    assert 0 < stats["accepted"][0] and stats["accepted"][-1] < stats["rounds"]  # partial rounds
    logits = logits[1:]  # the first pick is the first token, from the prefill
    n, emb = prompt.size(1), model.backbone.embeddings
    for r in range(stats["rounds"]):
        q = logits[r * k:(r + 1) * k]  # this round's k draft logits, (1, vocab) each
        d = torch.cat([x.argmax(-1, keepdim=True) for x in q], dim=1)  # (1, k): its drafts
        ext = torch.cat([seq[:, :n + 1], d], dim=1)  # t_0 .. t_n, d_1 .. d_k
        h = model.hidden(seq[:, :n])  # (1, n, d): H_0 .. H_{n-1}
        for j in range(1, k + 1):
            h = model.mtp_depth_module(j)(h, emb(ext[:, j:n + j]))
            assert_close(q[j - 1], model.lm_head(h[:, -1]), f"round {r}, depth {j}", atol=1e-4)
        kept = 0
        while kept < k and n + 1 + kept < seq.size(1) and d[0, kept] == seq[0, n + 1 + kept]:
            kept += 1
        n += kept + 1


def test_rejection_sampling_keeps_the_verifier_distribution():
    """The first token a round emits (a kept draft, or the residual draw after a rejection) is
    distributed as p, whatever q the draft came from: 20000 rounds, each probability within 0.015."""
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    for _ in range(20000):
        d = torch.multinomial(q[0], 1)
        j, nxt = accept(d, q, p, temperature=1.0)
        counts[d[0] if j == 1 else nxt] += 1
    assert_close(counts / counts.sum(), p[0], "first token's distribution", atol=0.015)


def test_sampled_speculative_decoding_runs():
    model = tiny(mtp_depth=1, mtp_share=True).eval()
    torch.manual_seed(4)
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=0.9, top_k=20, speculative=3)
    assert out.shape == (1, 23) and int(out.max()) < 256
    with pytest.raises(ValueError, match="MTP"):
        speculative_stream(tiny(), torch.zeros(1, 3, dtype=torch.long), 5, 2).__next__()
    with pytest.raises(ValueError, match="one per MTP depth"):
        speculative_stream(tiny(mtp_depth=2), torch.zeros(1, 3, dtype=torch.long), 5, 3).__next__()


def test_hf_folder_has_nvidia_mtp_layout(tmp_path):
    """mtp.layers.{s*L+j}: fusion (enorm, hnorm, eh_proj) on the set's first block, final_layernorm on
    its last, experts one by one; the folder loads back identically, and transformers still reads
    the main model from it (it ignores mtp.*)."""
    import safetensors
    model = tiny(mtp_depth=2).eval()
    model.save_pretrained(tmp_path)
    with safetensors.safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.mixer.experts.3.up_proj.weight",
                "mtp.layers.1.final_layernorm.weight", "mtp.layers.2.eh_proj.weight", "mtp.layers.3.norm.weight"):
        assert key in keys, key
    back = Nemotron.from_pretrained(str(tmp_path)).eval()
    assert (back.config.mtp_depth, back.config.mtp_pattern, back.config.mtp_share) == (2, "*E", False)
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    import transformers
    transformers.utils.logging.set_verbosity_error()
    theirs = transformers.NemotronHForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert_close(theirs(input_ids=x).logits, model(x)[0], "main logits", atol=1e-4)


def test_sample_py_speculative_flag(tmp_path):
    model = tiny(mtp_depth=1, mtp_share=True)
    model.save_pretrained(tmp_path / "hf")
    p = run_script("sample.py", f"--init_from={tmp_path / 'hf'}", "--max_new_tokens=12", "--temperature=0",
                   "--speculative=2", "--start=ab")
    assert p.returncode == 0 and "tokens per verification" in p.stderr, p.stderr[-2000:]
    tiny().save_pretrained(tmp_path / "plain")
    p = run_script("sample.py", f"--init_from={tmp_path / 'plain'}", "--speculative=2")
    assert p.returncode == 1 and "no MTP depths" in p.stderr and "Traceback" not in p.stderr
