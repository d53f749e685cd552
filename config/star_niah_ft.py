# Star Attention experiment, stage 2: the stage-1 model (config/star_niah.py) fine-tuned on a mix that
# is 80% retrieval, where the answer tokens weigh more in the loss. Stage 1 alone did not retrieve.
# python data/pycode_niah/prepare.py --frac=0.8 && python train.py config/star_niah_ft.py
exec(open('config/star_niah.py').read())
out_dir = 'out-star-niah-ft'
init_from = 'out-star-niah'
dataset = 'pycode_niah_80'
max_iters = 350
lr_decay_iters = 350
warmup_iters = 20
