# length extrapolation, Nemotron-H: three Mamba-2 layers per global NoPE attention layer, trained at
# 256 tokens like config/swan.py and config/swan_rope.py.
# python eval.py --init_from=out-swan-hybrid --lengths=256,1024,4096,8192   (docs/swan.md)
out_dir = 'out-swan-hybrid'
pattern = 'M-M-M-*-'
block_size = 256
batch_size = 16
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
eval_interval = 200
sample_new_tokens = 0
