# one GPU (an H100 or H200), bf16: a ~125M-parameter dense hybrid in Nemotron-H's layout (Mamba-2
# mixers with an attention layer every fourth one, each followed by a squared-ReLU MLP) on
# FineWeb-Edu with GPT-2's BPE. The Mamba-2 layers train through the Triton SSD kernels of triton_ops.py.
# bench.py kernels measures this config's training tokens/s with and without the kernels.
# UNTESTED on a GPU: written on a CPU-only machine. Lower batch_size if it runs out of memory.
# python data/fineweb_edu/prepare.py && python train.py config/gpu_125m.py
out_dir = 'out-gpu-125m'
dataset = 'fineweb_edu'
vocab_size = 50304                # GPT-2's 50257 rounded up to a multiple of 64
d_model = 768
pattern = 'M-M-M*-M-M-M*-M-M-M*-M-'  # 10 Mamba-2, 3 attention, 10 MLP: 130M parameters besides the embedding
n_head = 12
n_kv_head = 4
head_dim = 64
d_ff = 2304
mamba_heads = 24
mamba_head_dim = 64
d_state = 128
mamba_groups = 8
chunk_size = 128
doc_masking = True                # documents packed in a row do not see each other (seq_idx in the kernels)
batch_size = 16
block_size = 2048
gradient_accumulation_steps = 16  # 16 x 2048 x 16 = 524k tokens per step
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 300
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 500
eval_iters = 50
log_interval = 10
dtype = 'bfloat16'
compile = False                   # the kernels are the fast path; torch.compile around them is untried
