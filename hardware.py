"""
hardware.py: the devices. pick_device() chooses the one a script runs on (train.py, sample.py,
eval.py); HARDWARE is the GPUs we know, in one table: steptime.py prices parallel layouts with it,
train.py's MFU and bench.py's rooflines divide by its peaks.

Per GPU: dense (no sparsity) tensor-core peaks by precision (FLOP/s), memory size (GB) and
bandwidth (bytes/s), the link bandwidth per direction (bytes/s) inside the NVLink domain and out of
it, GPUs per NVLink domain, and SMs (a GEMM's output tiles run in waves of this many). From the
data sheets and ../shared/planner/conventions_and_hardware.md (NVIDIA's dgxc recipes): NVLink
600 / 900 / 1800 GB/s bidirectional; HDR InfiniBand 200 Gb/s per A100, NDR or RoCE 400 Gb/s per
H100 / B200 GPU. SM counts from the data sheets (B200: 148, as reported). The export parts H800
and A800 are an H100 and an A100 with 400 GB/s NVLink. host_bw: the GPU's link to its CPU's memory
per direction (activation offloading): PCIe Gen4 / Gen5 x16 (32 / 64 GB/s) on the x86 boards; on
GB200 / GB300 NVLink-C2C (900 GB/s both ways) to a Grace that two GPUs share, 225 GB/s each way. The
PCIe cards at the end carry no link figures: train.py and bench.py use their peaks, the planner
does not offer them.
"""

import torch


def pick_device(name):
    """The device for a script's --device: 'auto' takes cuda, then mps, then cpu; a named device
    ('cpu', 'cuda', 'cuda:1', 'mps') must exist on this machine, else ValueError says so."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == 'auto':
        return 'cuda' if cuda else 'mps' if mps else 'cpu'
    if name.startswith('cuda') and not cuda or name == 'mps' and not mps:
        raise ValueError(f"device={name!r}, but torch finds no such device on this machine "
                         f"(device='auto' takes what there is)")
    return name


def pick_dtype(name, device):
    """The weights' dtype for a script's --dtype: 'auto' takes bfloat16 on a GPU that has it (half
    the memory, tensor cores) and float32 elsewhere (what CPUs run fastest); else ValueError."""
    if name == 'auto':
        return torch.bfloat16 if device.startswith('cuda') and torch.cuda.is_bf16_supported() else torch.float32
    if name not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype={name!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    return getattr(torch, name)


HARDWARE = {
    "a100": dict(flops={"bf16": 312e12, "fp16": 312e12}, hbm_gb=80, hbm_bw=2.0e12,
                 nvlink_bw=300e9, net_bw=25e9, host_bw=32e9, gpus_per_node=8, sms=108),
    "a800": dict(flops={"bf16": 312e12, "fp16": 312e12}, hbm_gb=80, hbm_bw=2.0e12,
                 nvlink_bw=200e9, net_bw=25e9, host_bw=32e9, gpus_per_node=8, sms=108),
    "h100": dict(flops={"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, hbm_gb=80, hbm_bw=3.35e12,
                 nvlink_bw=450e9, net_bw=50e9, host_bw=64e9, gpus_per_node=8, sms=132),
    "h800": dict(flops={"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, hbm_gb=80, hbm_bw=3.35e12,
                 nvlink_bw=200e9, net_bw=50e9, host_bw=64e9, gpus_per_node=8, sms=132),
    "h200": dict(flops={"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, hbm_gb=141, hbm_bw=4.8e12,
                 nvlink_bw=450e9, net_bw=50e9, host_bw=64e9, gpus_per_node=8, sms=132),
    "b200": dict(flops={"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "fp4": 9000e12}, hbm_gb=180, hbm_bw=8e12,
                 nvlink_bw=900e9, net_bw=50e9, host_bw=64e9, gpus_per_node=8, sms=148),
    "gb200": dict(flops={"bf16": 2450e12, "fp16": 2450e12, "fp8": 4900e12, "fp4": 9800e12}, hbm_gb=186, hbm_bw=8e12,
                  nvlink_bw=900e9, net_bw=50e9, host_bw=225e9, gpus_per_node=72, sms=148),  # NVL72: one NVLink domain
    # Blackwell Ultra: the B200's 16-bit and FP8 peaks, 1.5x its FP4, 288 GB, ConnectX-8 (800 Gb/s per GPU)
    "b300": dict(flops={"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "fp4": 13500e12}, hbm_gb=270, hbm_bw=8e12,
                 nvlink_bw=900e9, net_bw=100e9, host_bw=64e9, gpus_per_node=8, sms=160),
    "gb300": dict(flops={"bf16": 2500e12, "fp16": 2500e12, "fp8": 5000e12, "fp4": 15000e12}, hbm_gb=279, hbm_bw=8e12,
                  nvlink_bw=900e9, net_bw=100e9, host_bw=225e9, gpus_per_node=72, sms=160),
    # PCIe cards: peaks and memory only
    "l40s": dict(flops={"bf16": 362e12, "fp16": 362e12}, hbm_gb=48, hbm_bw=864e9),
    "l4": dict(flops={"bf16": 121e12, "fp16": 121e12}, hbm_gb=24, hbm_bw=300e9),
    "a10": dict(flops={"bf16": 125e12, "fp16": 125e12}, hbm_gb=24, hbm_bw=600e9),
    "rtx4090": dict(flops={"bf16": 165e12, "fp16": 165e12}, hbm_gb=24, hbm_bw=1008e9),
}
CLUSTER_GPUS = [k for k, v in HARDWARE.items() if "nvlink_bw" in v]  # the ones the planner prices


def find_gpu(name):
    """The HARDWARE key of a GPU named as CUDA or a paper names it ("NVIDIA H100 80GB HBM3",
    "8x A800-SXM4"), or None. Longer keys are tried first: "GB200" is not a "B200", nor "A100" an
    "A10", nor "L40S" an "L4"."""
    name = name.upper().replace(" ", "")
    return next((k for k in sorted(HARDWARE, key=len, reverse=True) if k.upper() in name), None)


def peaks(name, precision="bf16"):
    """(dense peak FLOP/s in this precision, memory bytes/s) of the GPU of this name; (None, None)
    when it is not in the table."""
    hw = HARDWARE.get(find_gpu(name))
    return (hw["flops"].get(precision), hw["hbm_bw"]) if hw else (None, None)
