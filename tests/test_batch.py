"""
Tests for batched decoding over static caches (generate.py: StaticCache, decode_step, Engine,
generate_batch) and the experts' decoding path (moe.experts_static).

Run: python -m pytest -q tests/test_batch.py

References: the full forward over each whole sequence (logits, atol 1e-4 / rtol 1e-5 as in
test_model.py: the same maths in another order), each row decoded alone by model.generate (the
ordinary caches, batch 1: greedy tokens must be equal), experts_loop (the per-expert loop).
The compiled step is compared with the eager one token for token; it compiles once (~25 s here).
"""

import pytest
import torch

from generate import Engine, Request, StaticCache, decode_step, generate_batch, new_cache
from moe import experts_loop, experts_static
from test_model import LOGIT_TOL, tiny_model

# every layer kind; W with a window shorter than the sequences, so the ring wraps
PATTERNS = [dict(pattern="M*-EM*"), dict(pattern="MW*E", sliding_window=6), dict(pattern="ME*", mtp_depth=1)]


def prompts(lengths, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: kw["pattern"])
def test_static_step_matches_the_full_forward(kw):
    """Rows of different lengths in one StaticCache, each prefilled alone and copied in, then fed
    their own next tokens together: every step's logits equal the full forward's at that position."""
    model = tiny_model(**kw).eval()
    lengths, steps = [3, 11, 1], 14
    seqs = prompts([n + steps for n in lengths], seed=1)
    cache = StaticCache.empty(model, len(seqs), 40)
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        one = new_cache(model, 1, n)
        model.hidden(torch.tensor([seq[:n]]), one)
        cache.fill_row(b, one, n)
    full = [model(torch.tensor([seq]))[0][0] for seq in seqs]  # (T_b, vocab) each
    advance = torch.ones(len(seqs), dtype=torch.long)
    for t in range(steps):
        tokens = torch.tensor([[seq[n + t]] for seq, n in zip(seqs, lengths)])  # (B, 1)
        logits, greedy = decode_step(model, cache, tokens, advance)  # (B, vocab), (B,)
        assert torch.equal(greedy, logits.argmax(-1))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b], full[b][n + t], **LOGIT_TOL)
    assert cache.pos.tolist() == [n + steps for n in lengths]


@pytest.mark.parametrize("max_batch", [2, 5])
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: kw["pattern"])
def test_ragged_batch_greedy_equals_each_row_alone(kw, max_batch):
    """Five prompts of different lengths and limits; with max_batch=2 rows free up and later
    prompts join the running batch. Every row's greedy tokens are those of the row decoded alone."""
    model = tiny_model(**kw).eval()
    ps = prompts([4, 9, 1, 17, 6], seed=2)
    limits = [10, 3, 12, 7, 9]
    done = generate_batch(model, ps, limits, temperature=0, max_batch=max_batch)
    for p, n, r in zip(ps, limits, done):
        alone = model.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
        assert r.tokens == alone and r.finish == "length"
    padded = torch.full((len(ps), 17), 63)  # the same prompts as a padded tensor and their lengths
    for b, p in enumerate(ps):
        padded[b, :len(p)] = torch.tensor(p)
    again = generate_batch(model, padded, limits, temperature=0, max_batch=max_batch, lengths=[len(p) for p in ps])
    assert [r.tokens for r in again] == [r.tokens for r in done]


@torch.no_grad()
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: kw["pattern"])
def test_prompts_prefilled_together_leave_the_states_of_each_alone(kw):
    """Engine.add_many: ragged prompts right-padded into one forward (lengths 1 and 2: shorter than the
    conv window; 17 > the ring of 6 + 8: prefilled alone) leave each row's Mamba conv window and SSM
    state, attention keys and values and position as a prefill of that prompt alone does (1e-5),
    and the same first tokens."""
    model = tiny_model(**kw).eval()
    ps = prompts([5, 1, 17, 2, 8], seed=4)
    together, alone = Engine(model, 5, 32), Engine(model, 5, 32)
    assert together.add_many([Request(p, 4, temperature=0) for p in ps]) == 5
    for p in ps:
        assert alone.add(Request(p, 4, temperature=0))
    assert together.tokens.tolist() == alone.tokens.tolist() and together.cache.pos.tolist() == [5, 1, 17, 2, 8]
    for a, b in zip(together.cache.layers, alone.cache.layers):
        for name in ("conv", "ssm", "k", "v"):
            if hasattr(a, name):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    assert together.add_many([Request([1], 2)]) == 0  # no free row: nothing taken


def test_rows_keep_their_own_sampling_settings():
    """A greedy row, a top-k row and a top-p row with their own seeds: each gives the same tokens
    in the batch as alone, and the same again when rerun (its own generator)."""
    model = tiny_model(pattern="M*-EM*").eval()
    ps = prompts([5, 8, 3], seed=3)
    settings = dict(temperature=[0, 0.9, 1.2], top_k=[None, 5, None], top_p=[None, None, 0.8], seed=[None, 7, 11])
    batch = generate_batch(model, ps, 12, **settings)
    again = generate_batch(model, ps, 12, **settings)
    for b, p in enumerate(ps):
        alone = generate_batch(model, [p], 12, **{k: [v[b]] for k, v in settings.items()})[0]
        assert batch[b].tokens == alone.tokens == again[b].tokens
    assert batch[1].tokens != batch[2].tokens
    other_seed = generate_batch(model, ps[1:2], 12, temperature=0.9, top_k=5, seed=8)[0]
    assert other_seed.tokens != batch[1].tokens


def test_stop_tokens_end_their_row_only():
    model = tiny_model(pattern="M*-EM*").eval()
    ps = prompts([6, 4], seed=4)
    free = generate_batch(model, ps, 16, temperature=0)
    stop = free[0].tokens[5]
    first = free[0].tokens.index(stop)
    done = generate_batch(model, ps, 16, temperature=0, stop=[(stop,), ()])
    assert done[0].tokens == free[0].tokens[:first] and done[0].finish == "stop"
    assert done[1].tokens == free[1].tokens and done[1].finish == "length"


def test_engine_refuses_what_does_not_fit():
    model = tiny_model(pattern="M*").eval()
    engine = Engine(model, rows=2, max_len=16)
    with pytest.raises(ValueError, match="do not fit"):
        engine.add(Request(list(range(10)), max_new_tokens=7))
    with pytest.raises(ValueError, match="needs a token"):
        engine.add(Request([], max_new_tokens=3))
    assert engine.add(Request(list(range(10)), max_new_tokens=6, temperature=0))
    assert engine.add(Request([1, 2], max_new_tokens=6, temperature=0))
    assert not engine.add(Request([3], max_new_tokens=2))  # both rows busy
    with pytest.raises(ValueError, match="one value per prompt"):
        generate_batch(model, [[1], [2]], [3])


def test_a_failing_row_ends_alone():
    """A row whose logits cannot be sampled (temperature NaN: NaN probabilities) ends with an error;
    the rows beside it decode as if it had never been there."""
    model = tiny_model(pattern="M*-EM*").eval()
    ps = prompts([5, 7, 3], seed=8)
    engine = Engine(model, rows=3, max_len=32)
    rs = [Request(p, 6, temperature=t) for p, t in zip(ps, [0, 0, 0])]
    for r in rs:
        engine.add(r)
    rs[1].temperature = float("nan")  # after its first token: the failure comes inside a batched step
    while any(engine.requests):
        engine.step()
    assert rs[1].finish == "error" and "probability" in rs[1].error
    for r, p in zip([rs[0], rs[2]], [ps[0], ps[2]]):
        assert r.tokens == model.generate(torch.tensor([p]), 6, temperature=0)[0, len(p):].tolist()


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_experts_static_equals_the_loop(tokens):
    """The compiled decode step's experts (each token copy gathers its expert's weights), eager and
    compiled, against the per-expert loop; and Experts.forward compiled without autograd takes it."""
    model = tiny_model(pattern="E").eval()
    experts, gate = model.backbone.layers[0].mixer.experts, model.backbone.layers[0].mixer.gate
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(5))
    weights, idx = gate(x)
    ref = experts_loop(x, weights, idx, experts.up_proj, experts.down_proj)
    args = (x, weights, idx, experts.up_proj, experts.down_proj)
    torch.testing.assert_close(experts_static(*args), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.compile(experts_static, fullgraph=True)(*args), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.compile(experts, fullgraph=True)(x, weights, idx), ref, atol=1e-5, rtol=1e-5)


def test_compiled_step_gives_the_eager_tokens():
    """torch.compile(fullgraph=True) of the one-token step: the same greedy tokens as the eager
    step, compiled once per (rows, max_len) bucket and reused (no new graph on the next call)."""
    from torch._dynamo.utils import counters
    model = tiny_model(pattern="MW*E", sliding_window=6).eval()
    ps = prompts([5, 12, 2], seed=6)
    eager = generate_batch(model, ps, 9, temperature=0)
    compiled = generate_batch(model, ps, 9, temperature=0, compile=True)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    graphs = counters["stats"]["unique_graphs"]
    again = generate_batch(model, prompts([7, 3, 9], seed=7), 8, temperature=0, compile=True)  # same bucket
    assert counters["stats"]["unique_graphs"] == graphs and len(model._decode_steps) == 1
    idx = torch.tensor(ps[1:2])
    assert model.generate(idx, 9, temperature=0, compile=True).equal(model.generate(idx, 9, temperature=0))
    assert all(r.finish == "length" for r in again)
