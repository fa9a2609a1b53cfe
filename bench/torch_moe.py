#!/usr/bin/env python3
"""PyTorch eager baselines for burn-moe's benchmark (workload W4).

Times, on the CPU, with the same shapes, dtype (f32) and thread count as `moe-bench`:

- W1: an MoE layer, forward + backward, in two forms:
  * "loop": a Python loop over experts with index_select / index_add_ (how FastMoE's
    reference path and candle's MoE example run experts);
  * "sorted": assignments sorted by expert into a capacity-padded [E, C, d] buffer and one
    batched matmul (torch.bmm) per projection (what burn-moe does);
  and the dense FFN with the same active FLOPs (hidden = top_k * 1024).
- W2: one training step (forward, backward, AdamW) of a transformer shaped like burn-moe's
  `tiny` and `small` presets, with the "sorted" MoE layers.

Prints one JSON object on stdout (or writes it to --json). With --serve it answers
moe-bench's requests one run at a time instead, so that moe-bench can alternate PyTorch's runs
with its own. Written for burn-moe; see bench/README.md for the set-up.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

TOKENS, D_MODEL, D_HIDDEN = 4096, 512, 1024


def median_seconds(work, warmup, repeats):
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capacity_of(tokens, experts, top_k, factor, min_capacity=1):
    return max(min_capacity, min(tokens, math.ceil(top_k * tokens / experts * factor)))


class Experts(torch.nn.Module):
    """E GELU FFN experts stored stacked, like burn-moe's."""

    def __init__(self, experts, d, h):
        super().__init__()
        bound_in, bound_out = 1 / math.sqrt(d), 1 / math.sqrt(h)
        self.w_in = torch.nn.Parameter(torch.empty(experts, d, h).uniform_(-bound_in, bound_in))
        self.b_in = torch.nn.Parameter(torch.empty(experts, h).uniform_(-bound_in, bound_in))
        self.w_out = torch.nn.Parameter(torch.empty(experts, h, d).uniform_(-bound_out, bound_out))
        self.b_out = torch.nn.Parameter(torch.empty(experts, d).uniform_(-bound_out, bound_out))

    def one(self, e, x):
        return F.gelu(x @ self.w_in[e] + self.b_in[e]) @ self.w_out[e] + self.b_out[e]

    def batched(self, x):  # x: [E, C, d]
        hidden = F.gelu(torch.bmm(x, self.w_in) + self.b_in.unsqueeze(1))
        return torch.bmm(hidden, self.w_out) + self.b_out.unsqueeze(1)


class Moe(torch.nn.Module):
    """Softmax top-k gate with renormalisation, position drop policy, balancing loss."""

    def __init__(self, experts, top_k, d=D_MODEL, h=D_HIDDEN, capacity_factor=None, form="sorted"):
        super().__init__()
        self.experts, self.top_k, self.factor, self.form = experts, top_k, capacity_factor, form
        self.router = torch.nn.Parameter(torch.empty(d, experts).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.ffn = Experts(experts, d, h)

    def route(self, x):
        logits = x @ self.router
        probs = logits.softmax(-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        fraction = F.one_hot(index, self.experts).sum((0, 1)).float() / (index.numel())
        aux = self.experts * (fraction * probs.mean(0)).sum()
        return weights, index, aux

    def forward(self, x):  # x: [N, d]
        n = x.shape[0]
        weights, index, aux = self.route(x)
        flat_expert = index.reshape(-1)  # token-major: token n's choices together
        flat_token = torch.arange(n).repeat_interleave(self.top_k)
        flat_weight = weights.reshape(-1)
        # Position of each assignment within its expert, in token order.
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.experts)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel()) - starts[flat_expert[order]]
        if self.factor is None:
            capacity = int(counts.max())
        else:
            capacity = capacity_of(n, self.experts, self.top_k, self.factor)
        keep = position < capacity
        out = torch.zeros_like(x)
        if self.form == "loop":
            for e in range(self.experts):
                chosen = keep & (flat_expert == e)
                rows = flat_token[chosen]
                if rows.numel() == 0:
                    continue
                y = self.ffn.one(e, x.index_select(0, rows)) * flat_weight[chosen].unsqueeze(1)
                out = out.index_add(0, rows, y)
        else:
            slot = flat_expert[keep] * capacity + position[keep]
            rows = flat_token[keep]
            buffer = x.new_zeros(self.experts * capacity, x.shape[1]).index_copy(0, slot, x.index_select(0, rows))
            y = self.ffn.batched(buffer.view(self.experts, capacity, -1)).reshape(self.experts * capacity, -1)
            y = y.index_select(0, slot) * flat_weight[keep].unsqueeze(1)
            out = out.index_add(0, rows, y)
        return out, aux


def w1_cases(args):
    """W1's configurations as (row, step): `row` names the configuration, `step` runs one
    forward + backward pass."""
    cases = []
    x0 = torch.randn(TOKENS, D_MODEL)
    for top_k in (1, 2):
        dense = Experts(1, D_MODEL, top_k * D_HIDDEN)

        def dense_step(dense=dense):
            x = x0.clone().requires_grad_()
            dense.one(0, x).mean().backward()

        cases.append(({"form": "dense", "experts": 1, "top_k": top_k, "capacity": "-"}, dense_step))
        for experts in args.experts:
            if top_k > experts:
                continue
            for capacity in ("dropless", "capacity 1.25"):
                factor = None if capacity == "dropless" else 1.25
                for form in ("loop", "sorted"):
                    moe = Moe(experts, top_k, capacity_factor=factor, form=form)

                    def moe_step(moe=moe):
                        x = x0.clone().requires_grad_()
                        out, aux = moe(x)
                        (out.mean() + 0.01 * aux).backward()

                    cases.append(({"form": form, "experts": experts, "top_k": top_k, "capacity": capacity}, moe_step))
    return cases


def w1(args):
    rows = []
    for row, step in w1_cases(args):
        t = median_seconds(step, args.warmup, args.repeats)
        rows.append(dict(row, seconds=t, tokens_per_second=TOKENS / t))
    return rows


class RmsNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rotary(x, positions):  # x: [B, H, T, dh], rotate interleaved pairs
    dh = x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, dh, 2).float() / dh))
    angle = positions[:, None] * freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Block(torch.nn.Module):
    def __init__(self, d, heads, d_ff, moe):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RmsNorm(d), RmsNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.moe = moe
        self.ffn = None if moe is not None else Experts(1, d, d_ff)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        positions = torch.arange(t).float()
        q, k = rotary(q, positions), rotary(k, positions)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x).reshape(b * t, d)
        if self.moe is not None:
            y, aux = self.moe(h)
        else:
            y, aux = self.ffn.one(0, h), torch.zeros(())
        return x + y.view(b, t, d), aux


class Model(torch.nn.Module):
    def __init__(self, preset, vocab):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, preset["d_model"])
        torch.nn.init.normal_(self.embedding.weight, std=0.02)
        blocks = []
        for i in range(preset["layers"]):
            moe = None
            if (i + 1) % preset["moe_every"] == 0:
                moe = Moe(preset["experts"], preset["top_k"], preset["d_model"], preset["expert_hidden"], capacity_factor=1.25)
            blocks.append(Block(preset["d_model"], preset["heads"], preset["d_ff"], moe))
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm = RmsNorm(preset["d_model"])

    def forward(self, ids):
        x = self.embedding(ids)
        aux = torch.zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        return self.norm(x) @ self.embedding.weight.t(), aux


PRESETS = {
    "tiny": dict(d_model=128, layers=4, heads=4, context=64, d_ff=512, experts=4, top_k=2, expert_hidden=256, moe_every=2, batch=16),
    "small": dict(d_model=256, layers=6, heads=8, context=128, d_ff=1024, experts=8, top_k=2, expert_hidden=512, moe_every=2, batch=32),
}


def w2_row(name, vocab, warmup, repeats):
    """W2 for one preset: the median training step."""
    preset = PRESETS[name]
    model = Model(preset, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, vocab, (preset["batch"], preset["context"]))
    targets = torch.randint(0, vocab, (preset["batch"], preset["context"]))

    def step():
        optimizer.zero_grad()
        logits, aux = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)) + 0.01 * aux
        loss.backward()
        optimizer.step()

    t = median_seconds(step, warmup, repeats)
    tokens = preset["batch"] * preset["context"]
    return {"preset": name, "seconds": t, "tokens_per_second": tokens / t, "parameters": sum(p.numel() for p in model.parameters())}


def w2(args):
    return [w2_row(name, args.vocab, args.warmup, args.repeats) for name in args.presets]


def serve(args):
    """Answers moe-bench on stdin/stdout, so that its runs and ours alternate.

    Builds W1's configurations, prints one JSON line (torch version, threads, the
    configurations), then answers each line it reads: `w1 I` runs configuration I once and
    prints its seconds; `w2 PRESET WARMUP REPEATS` prints W2's JSON row for the preset; `quit`
    (or the end of stdin) stops.
    """
    cases = w1_cases(args)
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(), "w1": [row for row, _ in cases]}
    print(json.dumps(header), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "w1":
            step = cases[int(words[1])][1]
            start = time.perf_counter()
            step()
            print(time.perf_counter() - start, flush=True)
        elif words[0] == "w2":
            print(json.dumps(w2_row(words[1], args.vocab, int(words[2]), int(words[3]))), flush=True)
        else:
            print(json.dumps({"error": "unknown request " + line.strip()}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"])
    parser.add_argument("--vocab", type=int, default=4500)
    parser.add_argument("--json")
    parser.add_argument("--serve", action="store_true", help="answer moe-bench's requests on stdin (see serve())")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.serve:
        serve(args)
        return
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "w1": w1(args), "w2": w2(args)}
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
