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
Rows (Google Benchmark-style JSON, counter "ms", so bench/tools/results.py reads them like the C++
benchmarks):
  torch_block/<shape>/T=<t>             the block's forward
  torch_grouped_mm/<shape>/T=<t>/expert_mlp   the expert MLP alone on the block's sorted rows: two
                                        torch._grouped_mm and the activation (what cutlass_bench's
                                        cutlass_expert_mlp rows and layer_bench's experts stage run)
  torch_block_backward/<shape>/T=<t>    autograd's backward of the block (dx, the logits' gradient,
                                        the expert weights' and biases'), timed from the end of the
                                        forward; counters fwd_ms, bwd_ms, bwd_over_fwd — the baseline
                                        of layer_bench's ep1_backward rows. --quick: T = 128 and 4096.
                                        A torch without _grouped_mm's backward gives an error row. The file is rewritten after every case, so a
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
    # gpt-oss: interleaved gate/up, biases, clamped SwiGLU; the others: SwiGLU, gate then up
    o = expert_mlp(xs, offs, gate_up, down, kind, gate_up_bias, down_bias, counts)
    o = o.float() * w.flatten().index_select(0, order).unsqueeze(1)
    return torch.zeros(t, h, dtype=torch.float32, device=x.device).index_add_(0, token, o).to(x.dtype)


def expert_mlp(xs, offs, gate_up, down, kind, gate_up_bias, down_bias, counts):
    """The block's expert part on sorted rows: grouped_mm, activation, grouped_mm (biases for gpt-oss)."""
    i = gate_up.shape[1] // 2
    hmid = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    if kind == "gpt-oss":
        hmid = hmid + gate_up_bias.repeat_interleave(counts, dim=0)
        gate, up = hmid[:, 0::2].clamp(max=7.0), hmid[:, 1::2].clamp(-7.0, 7.0)
        a = (up + 1) * gate * torch.sigmoid(1.702 * gate)
    else:
        a = F.silu(hmid[:, :i]) * hmid[:, i:]
    o = torch._grouped_mm(a.to(xs.dtype), down.transpose(1, 2), offs=offs)
    if kind == "gpt-oss":
        o = o + down_bias.repeat_interleave(counts, dim=0)
    return o


def backward_ms(x, logits, gate_up, down, k, kind, bias, gate_up_bias, down_bias, reps, warmup):
    """(forward ms, backward ms) of the block under autograd: every input but the correction bias
    requires a gradient; the backward is timed from the end of its forward, gradients reset between."""
    leaves = [t.detach().requires_grad_() for t in (x, logits, gate_up, down, gate_up_bias, down_bias)]
    xg, lg, gu, dn, gub, dnb = leaves
    dy = torch.randn_like(x)
    fwd, bwd = [], []
    for rep in range(warmup + reps):
        for leaf in leaves:
            leaf.grad = None
        start, mid, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        y = block(xg, lg, gu, dn, k, kind, bias, gub, dnb)
        mid.record()
        y.backward(dy)
        stop.record()
        stop.synchronize()
        if rep >= warmup:
            fwd.append(start.elapsed_time(mid))
            bwd.append(mid.elapsed_time(stop))
    return statistics.median(fwd), statistics.median(bwd)


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
    # Three passes over the shapes, the block's forward first: a run stopped by the bundle's budget
    # keeps the comparison that matters most (the files are rewritten after every case).
    for what in ("block", "grouped_mm", "backward"):
        for name, h, i, e, k, kind in SHAPES:
            gate_up = (torch.randn(e, 2 * i, h, device=dev) / h**0.5).to(torch.bfloat16)
            down = (torch.randn(e, h, i, device=dev) / i**0.5).to(torch.bfloat16)
            gate_up_bias = (0.1 * torch.randn(e, 2 * i, device=dev)).to(torch.bfloat16)
            down_bias = (0.1 * torch.randn(e, h, device=dev)).to(torch.bfloat16)
            bias = 0.1 * torch.randn(e, device=dev)
            for t in TOKENS:
                if what == "backward" and args.quick and t > 4096:
                    continue
                x = torch.randn(t, h, device=dev).to(torch.bfloat16)
                logits = torch.randn(t, e, device=dev)
                if what == "block":
                    ms = time_ms(lambda: block(x, logits, gate_up, down, k, kind, bias, gate_up_bias, down_bias),
                                 reps, warmup)
                    rows.append({"name": f"torch_block/{name}/T={t}", "run_type": "iteration", "ms": ms})
                    print(f"{name} T={t}: {ms:.3f} ms", flush=True)
                elif what == "grouped_mm":  # the expert MLP alone, on the rows the block's router sorted
                    ids, _ = route(logits, kind, k, bias)
                    flat = ids.flatten()
                    counts = torch.bincount(flat, minlength=e)
                    offs = torch.cumsum(counts, 0).to(torch.int32)
                    xs = x.index_select(0, torch.argsort(flat, stable=True) // k)
                    ms = time_ms(lambda: expert_mlp(xs, offs, gate_up, down, kind, gate_up_bias, down_bias, counts),
                                 reps, warmup)
                    rows.append({"name": f"torch_grouped_mm/{name}/T={t}/expert_mlp", "run_type": "iteration",
                                 "ms": ms})
                    print(f"{name} T={t} grouped_mm expert MLP: {ms:.3f} ms", flush=True)
                    del xs
                else:
                    row = {"name": f"torch_block_backward/{name}/T={t}", "run_type": "iteration"}
                    try:
                        fwd, bwd = backward_ms(x, logits, gate_up, down, k, kind, bias, gate_up_bias, down_bias,
                                               reps, warmup)
                        row.update(ms=bwd, fwd_ms=fwd, bwd_ms=bwd, bwd_over_fwd=bwd / fwd)
                        print(f"{name} T={t} backward: {bwd:.3f} ms (forward {fwd:.3f} ms)", flush=True)
                    except (RuntimeError, NotImplementedError) as err:  # e.g. no _grouped_mm backward
                        row.update(error_occurred=True, error_message=str(err).splitlines()[0][:200])
                        print(f"{name} T={t} backward: {row['error_message']}", flush=True)
                    rows.append(row)
                write()
                torch.cuda.empty_cache()
            del gate_up, down
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
