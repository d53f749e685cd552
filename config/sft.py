# Supervised fine-tuning with the reasoning switch (Llama-Nemotron, Nemotron 3): the default
# pretrained model (`python train.py` writes out/) on data/sft, chat turns built from data/envs.py's
# demonstrations, half with thinking on and half off, the loss on the assistant's tokens only.
#   python train.py                                        # pretrain: out/ (2-3 min on 2 cores)
#   python data/sft/prepare.py && python train.py config/sft.py   # fine-tune: out-sft/
init_from = 'out'           # fine-tune this checkpoint (its model; fresh optimizer and schedule)
out_dir = 'out-sft'
dataset = 'sft'
doc_masking = True          # one conversation per document: nothing reads across "\0"
block_size = 512            # every conversation fits (data/envs.py TASK_BYTES; tests/test_sft.py)
batch_size = 8
max_iters = 800
lr_decay_iters = 800
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 200
sample_new_tokens = 0
