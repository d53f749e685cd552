# a quick laptop run: a 0.14M-parameter hybrid with all four layer kinds, ~1.5 minutes on a 2-core CPU
# python train.py config/tiny_cpu.py
out_dir = 'out-tiny'
d_model = 64
pattern = 'M*-E'
n_head = 2
n_kv_head = 1
head_dim = 32
d_ff = 256
mamba_heads = 2
mamba_head_dim = 64
d_state = 16
chunk_size = 32
n_experts = 4
moe_d_ff = 64
shared_d_ff = 128
batch_size = 16
block_size = 128
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 200
eval_iters = 10
sample_new_tokens = 200
