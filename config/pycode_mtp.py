# The MTP nano experiment (docs/mtp.md): the default model and data (pycode, 1000 steps) with D
# multi-token-prediction depths, each one attention + MoE block ('*E', as Nemotron 3 Super), shared
# lambda = 0.3 (DeepSeek-V3's early value). Depth 1 shares its weights, so it can draft any number
# of tokens; run D = 2 with its own weights per depth:
#   python train.py config/pycode_mtp.py                                   # D = 1 -> out-mtp1
#   python train.py config/pycode_mtp.py --mtp_depth=2 --mtp_share=False --out_dir=out-mtp2
#   python sample.py --init_from=out-mtp1 --speculative=2 --temperature=0
out_dir = 'out-mtp1'
mtp_depth = 1
mtp_pattern = '*E'
mtp_share = True
mtp_loss_weight = 0.3
mamba_groups = 1                  # as docs/mtp.md's table was measured (train.py's default became 2 for --tp=2)
