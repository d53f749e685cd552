# Nano experiment: low-precision training (docs/lowprec.md). The default model ('M*M-ME', 0.87M params) on
# pycode for 150 steps of 8 x 128 tokens (sized for a shared 2-core CPU, where every low-precision
# GEMM is emulated), the same data, init and schedule in every run; only --precision changes:
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=bf16  --out_dir=out-lowprec-bf16
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=fp8   --out_dir=out-lowprec-fp8
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=mxfp8 --out_dir=out-lowprec-mxfp8
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=nvfp4 --out_dir=out-lowprec-nvfp4
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=nvfp4 --nvfp4_rht=False \
#       --out_dir=out-lowprec-nvfp4-no_rht
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=nvfp4 --nvfp4_sr=False \
#       --out_dir=out-lowprec-nvfp4-no_sr
#   OMP_NUM_THREADS=1 python train.py config/lowprec.py --precision=nvfp4 --nvfp4_2d=False \
#       --out_dir=out-lowprec-nvfp4-no_2d
#   python plot.py runs out-lowprec-* --out=lowprec.png     # val loss relative to the first (bf16), curves
# On a CPU every low-precision GEMM is emulated (triton_ops.py) and "bf16" is train.py's fp32.
# docs/lowprec.md: "Nano experiment: FP8 and NVFP4 training".
out_dir = 'out-lowprec-bf16'
batch_size = 8
max_iters = 150
lr_decay_iters = 150
warmup_iters = 20
eval_interval = 75
sample_new_tokens = 0
