# Star Attention experiment (README "Long context"): a SWAN-style attention-only model (sliding-window
# RoPE layers W and global NoPE layers *) trained on pycode mixed with RULER needle retrieval at
# 400-1000 tokens, then tested at 2K-8K with full attention and with Star Attention:
# python data/pycode_niah/prepare.py && python train.py config/star_niah.py
# python eval.py --init_from=out-star-niah --tasks=niah_single_1 --lengths=2048,4096,8192 --star_blocks=0,512,1024,2048
out_dir = 'out-star-niah'
dataset = 'pycode_niah'
pattern = 'W-*-W-*-'
sliding_window = 128
swan_train_len = 768
block_size = 768
batch_size = 8
max_iters = 450
lr_decay_iters = 450
warmup_iters = 50
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 150
sample_new_tokens = 0
