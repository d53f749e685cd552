# length extrapolation, baseline (SWAN-GPT's comparison): every attention layer global with RoPE.
# Trained at 256 tokens like config/swan.py and config/swan_hybrid.py, then
# python eval.py --init_from=out-swan-rope --lengths=256,1024,4096,8192     (docs/swan.md)
out_dir = 'out-swan-rope'
pattern = '*-*-*-*-'
rope = True
block_size = 256
batch_size = 16
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
eval_interval = 200
sample_new_tokens = 0
