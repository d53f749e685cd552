# Stage 1 of the Star Attention experiment (docs/star.md): an attention-only SWAN-style model
# (sliding-window RoPE layers W with a 16-token window, global NoPE layers *) learns to copy on copy
# drills alone: an induction head in the global layers, which NIAH retrieval builds on; trained on NIAH
# alone it never left the loss plateau (LOG.md, stops 13-14). config/star_niah.py fine-tunes it.
# python data/pycode_niah/prepare.py --drills_only && python train.py config/star_copy.py
out_dir = 'out-star-copy'
dataset = 'copy_drills'
doc_masking = True            # every drill is a document of its own, started by "\0"
pattern = 'W-*-W-*-'
sliding_window = 16           # far below the drills' copy distance (56-143): only '*' layers can copy
swan_train_len = 768
block_size = 512              # two 256-token drills per row
batch_size = 16
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 250
eval_iters = 20
sample_new_tokens = 0
