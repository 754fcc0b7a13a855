#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""The in-process baseline of bench/layer_bench.cu: the MoE block as a PyTorch user writes it
(the scheme of Hugging Face transformers' blocks with grouped_mm experts), timed on the same GPU in
the same session, on the four shapes of ../shared/PERFORMANCE.md, bf16, random data, ep = 1.

    python3 bench/torch_moe_block.py --out bench/results/torch-block-h100.json
    python3 bench/torch_moe_block.py --quick --out torch.json    # the GPU check bundle's short run

Router (per the model's semantics) -> stable argsort of the expert ids -> gather ->
torch._grouped_mm (gate_up) -> activation -> torch._grouped_mm (down) -> weighted index_add.
Output: Google Benchmark-style JSON ("torch_block/<shape>/T=<tokens>", counter "ms"), so
bench/tools/results.py reads it like the C++ benchmarks. The file is rewritten after every case, so a
run stopped from outside (the GPU check bundle's timeout) keeps the cases it finished.
"""

import argparse
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F

SHAPES = [  # name, hidden, intermediate, experts, top_k, kind
    ("qwen3-30b-a3b", 2048, 768, 128, 8, "softmax"),
    ("mixtral-8x7b", 4096, 14336, 8, 2, "softmax"),
    ("gpt-oss-120b", 2880, 2880, 128, 4, "gpt-oss"),
    ("deepseek-v3", 7168, 2048, 256, 8, "deepseek"),
]
TOKENS = [128, 4096, 16384]


def route(logits, kind, k, bias):
    if kind == "softmax":  # Qwen3-MoE, Mixtral: softmax -> top-k -> renormalise
        w, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)
    if kind == "gpt-oss":  # top-k on the logits, softmax over the k
        v, ids = torch.topk(logits.float(), k, dim=-1)
        return ids, torch.softmax(v, dim=-1)
    # DeepSeek-V3: sigmoid, selection on score + bias, 8 groups scored by their top-2, top-4 groups kept
    scores = torch.sigmoid(logits.float())
    sel = scores + bias
    t, e = sel.shape
    groups = sel.view(t, 8, e // 8).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(4, dim=-1).indices, 1.0)
    mask = keep.unsqueeze(-1).expand(t, 8, e // 8).reshape(t, e)
    ids = sel.masked_fill(mask == 0, float("-inf")).topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5


def block(x, logits, gate_up, down, k, kind, bias, gate_up_bias, down_bias):
    t, h = x.shape
    e, two_i, _ = gate_up.shape
    i = two_i // 2
    ids, w = route(logits, kind, k, bias)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    token = order // k
    xs = x.index_select(0, token)
    hmid = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    if kind == "gpt-oss":  # interleaved gate/up, biases, clamped SwiGLU
        hmid = hmid + gate_up_bias.repeat_interleave(counts, dim=0)
        gate, up = hmid[:, 0::2].clamp(max=7.0), hmid[:, 1::2].clamp(-7.0, 7.0)
        a = (up + 1) * gate * torch.sigmoid(1.702 * gate)
    else:
        a = F.silu(hmid[:, :i]) * hmid[:, i:]
    o = torch._grouped_mm(a.to(x.dtype), down.transpose(1, 2), offs=offs)
    if kind == "gpt-oss":
        o = o + down_bias.repeat_interleave(counts, dim=0)
    o = o.float() * w.flatten().index_select(0, order).unsqueeze(1)
    return torch.zeros(t, h, dtype=torch.float32, device=x.device).index_add_(0, token, o).to(x.dtype)


def time_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/torch-block-h100.json")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 5 timed calls per case, not 3 and 20")
    args = parser.parse_args()
    torch.manual_seed(2026)
    dev = torch.device("cuda")
    reps, warmup = (5, 1) if args.quick else (20, 3)
    context = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0),
               "epx_repetitions": f"median of {reps} calls after {warmup} warm-up" + (" (--quick)" if args.quick else "")}
    rows = []

    def write():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"context": context, "benchmarks": rows}, f, indent=1)
        os.replace(tmp, args.out)

    write()
    for name, h, i, e, k, kind in SHAPES:
        gate_up = (torch.randn(e, 2 * i, h, device=dev) / h**0.5).to(torch.bfloat16)
        down = (torch.randn(e, h, i, device=dev) / i**0.5).to(torch.bfloat16)
        gate_up_bias = (0.1 * torch.randn(e, 2 * i, device=dev)).to(torch.bfloat16)
        down_bias = (0.1 * torch.randn(e, h, device=dev)).to(torch.bfloat16)
        bias = 0.1 * torch.randn(e, device=dev)
        for t in TOKENS:
            x = torch.randn(t, h, device=dev).to(torch.bfloat16)
            logits = torch.randn(t, e, device=dev)
            ms = time_ms(lambda: block(x, logits, gate_up, down, k, kind, bias, gate_up_bias, down_bias), reps, warmup)
            rows.append({"name": f"torch_block/{name}/T={t}", "run_type": "iteration", "ms": ms})
            print(f"{name} T={t}: {ms:.3f} ms", flush=True)
            write()
        del gate_up, down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
