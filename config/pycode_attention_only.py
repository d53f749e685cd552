# the Nemotron-H comparison at nano scale: the default hybrid (python train.py) against a
# Transformer of the same depth, width, MLP/MoE layers, steps and data, every Mamba layer (M)
# replaced by attention with RoPE; twice the heads bring its parameters close to the hybrid's.
# python train.py config/pycode_attention_only.py      (docs/hybrid.md)
out_dir = 'out-attention'
pattern = '***-*E'
rope = True
n_head = 8
n_kv_head = 4
