# length extrapolation, SWAN-GPT (arXiv:2504.08719): three sliding-window RoPE layers (W, window 128)
# per global NoPE layer (*), trained at 256 tokens. swan_train_len turns on the NoPE layers' dynamic
# query scaling, which only acts beyond 256; eval.py --swan=off measures the model without it.
# python eval.py --init_from=out-swan --lengths=256,1024,4096,8192          (docs/swan.md)
out_dir = 'out-swan'
pattern = 'W-W-W-*-'
sliding_window = 128
swan_train_len = 256
block_size = 256
batch_size = 16
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
eval_interval = 200
sample_new_tokens = 0
