# LatentMoE at nano scale (Nemotron 3), the baseline: a standard MoE whose 16 routed experts, top-2,
# work at the full width d = 128. config/moe_latent.py is the same model with LatentMoE; both have
# 1,593,188 parameters, 675,684 of them active per token (embeddings excluded), 400 steps on pycode.
# OMP_NUM_THREADS=1 python train.py config/moe_standard.py     (docs/moe.md)
out_dir = 'out-moe-standard'
pattern = 'M*MEME'     # the default hybrid with its MLP layer made an MoE layer too: two MoE layers
n_experts = 16
top_k = 2
moe_d_ff = 128
shared_d_ff = 256
max_iters = 400
lr_decay_iters = 400
eval_interval = 100
mamba_groups = 1                  # as docs/moe.md's table was measured (train.py's default became 2 for --tp=2)
