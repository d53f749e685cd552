# Star Attention experiment (docs/star.md), stage 2: the copy-trained model of
# config/star_copy.py fine-tuned on RULER needle retrieval at 400-750 tokens (niah_single_1, the loss
# on the answers), copy drills and pycode, one "\0"-started document each (data/pycode_niah/prepare.py),
# then tested at 2K-8K with full attention and with Star Attention:
# python data/pycode_niah/prepare.py --drills_only && python train.py config/star_copy.py
# python data/pycode_niah/prepare.py && python train.py config/star_niah.py
# python eval.py --init_from=out-star-niah --tasks=niah_single_1 --lengths=2048,4096,8192 --star_blocks=0,512,1024,2048
out_dir = 'out-star-niah'
init_from = 'out-star-copy'
dataset = 'pycode_niah'
doc_masking = True            # as in stage 1; eval.py then starts each prompt with "\0" (--bos=auto)
block_size = 768
batch_size = 8
max_iters = 400
lr_decay_iters = 400
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 100
eval_iters = 20
sample_new_tokens = 0
