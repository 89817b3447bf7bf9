"""Micro-benchmark of the displacement network on this machine (CPU unless ``--device``).

Measures inference throughput (patches/s) of one :class:`wsireg.model.network.UNet` on ``G``-sized
groups of ``P x P`` patch pairs, and the peak memory of one group's forward pass under
``torch.inference_mode`` (the rise of the process's peak RSS over the first forward, after the
model and inputs exist; on CUDA ``torch.cuda.max_memory_allocated``). Prints one JSON line.

    python benchmarks/network_speed.py --patch 256 --group 16

Numbers on shared machines are noisy: the median over ``--repeats`` groups is reported along
with the best and worst, and the load average at the start. ``--memory-format`` is the layout of
the weights: ``channels_last`` (NHWC, how :meth:`~wsireg.model.network.MultiLevelModel.load`
holds them for inference) or ``contiguous`` (NCHW, PyTorch's default). ``--precision``: the
arithmetic (:func:`wsireg.model.inference.network_dtype`; ``bfloat16`` through autocast, as
inference runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from wsireg.engine.parallel import (
    peak_rss_mib,  # VmHWM (a child's ru_maxrss starts at its parent's peak)
)
from wsireg.model.inference import PRECISIONS, network_dtype
from wsireg.model.network import UNet, UNetConfig, num_parameters, resolve_device

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=256, help="patch side P")
    parser.add_argument("--group", type=int, default=16, help="group size G")
    parser.add_argument("--repeats", type=int, default=5, help="timed groups")
    parser.add_argument(
        "--widths", type=str, default="16,32,64,128,256", help="encoder widths, comma separated"
    )
    parser.add_argument("--device", type=str, default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="channels_last")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    args = parser.parse_args()

    device = resolve_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    config = UNetConfig(widths=widths, head_width=widths[0])
    torch.manual_seed(0)
    net = UNet(config).to(device, memory_format=MEMORY_FORMATS[args.memory_format]).eval()
    moving = torch.rand(args.group, 1, args.patch, args.patch, device=device)
    fixed = torch.rand_like(moving)

    load = os.getloadavg()[0]
    dtype = network_dtype(args.precision, device)
    low = dtype != torch.float32
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=low):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = peak_rss_mib()
        net(moving, fixed)  # warm-up, and the peak-memory measurement
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mb = peak_rss_mib() - rss0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            net(moving, fixed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)

    params = num_parameters(net)
    result = {
        "benchmark": "network_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "patch": args.patch,
        "group": args.group,
        "widths": list(widths),
        "memory_format": args.memory_format,
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "weights_mb_fp32": round(params * 4 / 2**20, 2),
        "patches_per_s": round(args.group / statistics.median(times), 2),
        "patches_per_s_best": round(args.group / min(times), 2),
        "patches_per_s_worst": round(args.group / max(times), 2),
        "group_peak_mb": round(peak_mb, 1),
        "loadavg_1min": round(load, 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
