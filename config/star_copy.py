# Stage 1 of the Star Attention experiment (README "Long context"): the model that config/star_niah.py
# fine-tunes learns to copy across more than its W window on copy drills alone (induction heads in the global
# NoPE layers), before retrieval. Plain NIAH training never left the loss plateau (LOG.md, stops 13-14).
# python data/pycode_niah/prepare.py --drills_only && python train.py config/star_copy.py
out_dir = 'out-star-copy'
dataset = 'copy_drills'
pattern = 'W-*-W-*-'
sliding_window = 16           # far below the drills' copy distance (64-119): only '*' layers can copy
swan_train_len = 768
block_size = 512
batch_size = 8
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 50
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 500
eval_iters = 20
sample_new_tokens = 0
