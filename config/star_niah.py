# Star Attention experiment (README "Long context"), stage 2: the copy-trained model of
# config/star_copy.py (a SWAN-style attention-only model: sliding-window RoPE layers W, window 16,
# and global NoPE layers *) fine-tuned on pycode mixed with RULER needle retrieval at 400-750
# tokens and copy drills (the loss on the answers and copies only), then tested at 2K-8K with full
# attention and with Star Attention:
# python data/pycode_niah/prepare.py --drills_only && python train.py config/star_copy.py
# python data/pycode_niah/prepare.py && python train.py config/star_niah.py
# python eval.py --init_from=out-star-niah --tasks=niah_single_1 --lengths=2048,4096,8192 --star_blocks=0,512,1024,2048
out_dir = 'out-star-niah'
init_from = 'out-star-copy'
dataset = 'pycode_niah'
block_size = 768
batch_size = 8
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 100
learning_rate = 3e-4          # a third of stage 1's: a fine-tune of what the drills taught, not a restart
min_lr = 3e-5
eval_interval = 250
eval_iters = 20
sample_new_tokens = 0
