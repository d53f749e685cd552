# Budget control as a second SFT stage (Nemotron Nano 2): an SFT model that thinks in full goes on
# fine-tuning, at a lower learning rate, on a set where a share of its thinking-on examples state a
# budget ("Think for at most B tokens.") and show only the trace's lines that fit in 0.75 B. It learns
# to keep a stated budget without losing the full thinking it had (docs/posttraining.md, "Budgets
# taught by demonstration"). A budget mix from the start costs the trained-late skills instead.
#   python data/sft/prepare.py --budget_frac=0.5 --out_dir=data/sft_budget
#   python train.py config/sft_budget.py                   # out-sft/ -> out-sft-budget/
init_from = 'out-sft'
out_dir = 'out-sft-budget'
dataset = 'sft_budget'
doc_masking = True
block_size = 512
batch_size = 8
max_iters = 1200
lr_decay_iters = 1200
warmup_iters = 20
learning_rate = 3e-4
min_lr = 3e-5
eval_interval = 200
sample_new_tokens = 0
