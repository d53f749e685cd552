# one H100 (80 GB), bf16 + torch.compile: a ~0.4B-parameter (~0.15B active) Nemotron-3-Nano-shaped
# hybrid, Mamba-2 and MoE layers alternating with a few attention layers, on FineWeb-Edu.
# UNTESTED: written on a CPU-only machine; the sizes are estimates. Lower batch_size if it runs out of memory.
# python data/fineweb_edu/prepare.py && python train.py config/nano_h100.py
# (8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py)
out_dir = 'out-nano-h100'
dataset = 'fineweb_edu'
d_model = 768
pattern = 'MEMEM*EMEMEM*EMEMEM*EME'
n_head = 12
n_kv_head = 4
head_dim = 64
mamba_heads = 24
mamba_head_dim = 64
d_state = 128
mamba_groups = 8
chunk_size = 128
n_experts = 32
top_k = 4
moe_d_ff = 512
shared_d_ff = 1536
batch_size = 16
block_size = 2048
gradient_accumulation_steps = 8   # 16 x 2048 x 8 = 262k tokens per step
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 500
eval_iters = 50
log_interval = 10
dtype = 'bfloat16'
compile = True
