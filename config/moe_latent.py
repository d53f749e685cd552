# LatentMoE at nano scale (Nemotron 3): the routed experts read and write a latent width
# l = d / r = 32 (r = 4), and the number of experts and the top-k grow by r: 64 experts, top-8,
# each as wide (moe_d_ff) as the baseline's. Routed-expert parameters, active (k * 2 l F) and total
# (E * 2 l F), equal config/moe_standard.py's, and so does the per-token all-to-all payload (k * l).
# The shared expert gives up the width that pays for the latent projections (2 d l) and the 4x
# router (48 d more): 2 d (256 - 200) = 2 d l + 48 d. Same active and total parameters, steps, data.
# OMP_NUM_THREADS=1 python train.py config/moe_latent.py       (docs/moe.md)
out_dir = 'out-moe-latent'
pattern = 'M*MEME'
n_experts = 64
top_k = 8
moe_d_ff = 128
moe_latent_size = 32
shared_d_ff = 200
max_iters = 400
lr_decay_iters = 400
eval_interval = 100
mamba_groups = 1                  # as docs/moe.md's table was measured (train.py's default became 2 for --tp=2)
