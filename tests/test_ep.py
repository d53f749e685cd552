"""
Expert parallelism of moe.py (shard_experts, dispatch_experts, AllToAll, gather_experts): two
processes on the CPU (gloo), each with half of a global batch and half of every MoE layer's
experts, give the loss, the logits and the gradient of every parameter that one process gives on
the whole batch, also when an expert, or all the experts of a rank, receive no tokens.
train.py's use of it (DDP beside it, replicas, clipping, checkpoints) is tested in test_train.py.

Run: python -m pytest -q tests/test_ep.py        (about 10 s: two processes start)
"""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_close
from model import Nemotron, NemotronConfig
from moe import MoE, gather_experts, shard_experts, unshard_experts

WORLD = 2
B, T = 3, 8  # sequences per rank, tokens per sequence
# two MoE layers (the collectives of both must pair up in order), one of them LatentMoE-sized
CFG = NemotronConfig(d_model=16, pattern="E-E", d_ff=16, n_experts=4, top_k=2, moe_d_ff=8,
                     shared_d_ff=8, moe_seq_aux_coef=0.01)
# which experts the routers cannot choose (a -10 correction bias): none; expert 3, which rank 1
# holds, so rank 1 receives no tokens for it; experts 2 and 3, so rank 1 receives nothing at all
CASES = {"random": [], "idle expert": [3], "idle rank": [2, 3]}


def make_model(blocked, latent):
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**{**CFG.to_dict(), "moe_latent_size": latent}))
    for m in model.modules():
        if isinstance(m, MoE):
            torch.nn.init.normal_(m.gate.weight, std=0.5)  # varied routing at init
            m.gate.e_score_correction_bias[blocked] = -10.0
    return model.train()


def global_batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (WORLD * B, T + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()  # (WORLD*B, T) each


def loss_and_grads(model, x, y):
    """The trained loss (LM + the routers' balance loss), the logits and every parameter's grad."""
    logits, loss = model(x, y)
    loss = loss + sum(m.gate.aux_loss for m in model.modules() if isinstance(m, MoE))
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def run_rank(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    group = dist.new_group(list(range(WORLD)))
    x, y = global_batch()
    mine = slice(rank * B, (rank + 1) * B)
    results = {}
    for latent in (None, 8):
        for case, blocked in CASES.items():
            model = make_model(blocked, latent)
            full = {n: p.detach().clone() for n, p in model.named_parameters()}
            moes = [m for m in model.modules() if isinstance(m, MoE)]
            for m in moes:
                shard_experts(m, group)
            loss, logits, grads = loss_and_grads(model, x[mine], y[mine])
            # as train.py: the mean over ranks. The all-to-all backward has already summed both
            # ranks' tokens into each expert shard's grad; the other grads are each rank's own
            dist.all_reduce(loss)
            params = dict(model.named_parameters())
            for n, g in grads.items():
                if n.endswith(("experts.up_proj", "experts.down_proj")):  # None if no token came
                    grads[n] = gather_experts(torch.zeros_like(params[n]) if g is None else g, group)
                else:
                    dist.all_reduce(g)
            parts = [torch.empty_like(logits) for _ in range(WORLD)]
            dist.all_gather(parts, logits)
            for m in moes:
                unshard_experts(m)
            restored = all(torch.equal(p, full[n]) for n, p in model.named_parameters())
            results[(case, latent)] = {"loss": loss / WORLD, "logits": torch.cat(parts), "restored": restored,
                                       "grads": {n: g / WORLD for n, g in grads.items()}}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    mp.spawn(run_rank, args=(str(tmp / "store"), str(tmp / "out.pt")), nprocs=WORLD)
    return torch.load(tmp / "out.pt", weights_only=True)


@pytest.mark.parametrize("latent", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(ep_results, case, latent):
    """fp32: the loss to 1e-6 relative, logits and every gradient to 1e-5 relative (plus 1e-7
    absolute for grads near zero): only the order of float sums differs."""
    ep = ep_results[(case, latent)]
    model = make_model(CASES[case], latent)
    x, y = global_batch()
    loss, logits, grads = loss_and_grads(model, x, y)
    if CASES[case]:  # the blocked experts really were idle: a zero gradient in one process too
        g = grads["backbone.layers.0.mixer.experts.up_proj"]
        assert g[CASES[case]].abs().max() == 0 and g[0].abs().max() > 0
    assert_close(ep["loss"], loss, "loss", atol=0, rtol=1e-6)
    assert_close(ep["logits"], logits, "logits", atol=1e-6, rtol=1e-5)
    assert ep["grads"].keys() == grads.keys()
    for n, g in grads.items():
        assert_close(ep["grads"][n], g, f"grad of {n}", atol=1e-7, rtol=1e-5)
    assert ep["restored"]  # unshard_experts gives back the whole, unchanged experts
