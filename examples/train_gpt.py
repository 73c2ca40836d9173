#!/usr/bin/env python3
"""End to end: pack a text corpus into token shards, then train a small GPT on it with
TokenLoader, checkpointing the loader's state so a restart continues the exact stream.

    python examples/train_gpt.py --steps 200      # packs examples/data/tinyshakespeare.txt

The corpus ships with the repository (tinyshakespeare, public domain, 1.1 MB), so the
example needs nothing beside the checkout; --text takes any other text file.

Runs on CPU (a tiny model) or on a GPU (--device cuda). Prints loss, tokens/s and the
loader's stall time (how long the training loop waited for data).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmio_native as lio
from llmio_native.cli import main as llmio


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, T: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device))
        h = self.blocks(h, mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(h))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                   "tinyshakespeare.txt"),
                    help="text corpus to pack (default: the tinyshakespeare copy in examples/data)")
    ap.add_argument("--data", default="out/tinyshakespeare", help="dataset directory (packed on first run)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--codec", default="zstd", choices=["none", "zstd", "rans"],
                    help="shard codec when packing (rans: decoded on the GPU with --device cuda)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt", default="out/train_gpt.pt", help="model + optimizer + loader state")
    a = ap.parse_args()

    if not os.path.exists(os.path.join(a.data, "manifest.json")):
        print(f"packing {a.text} -> {a.data}")
        rc = llmio(["pack", a.text, "-o", a.data, "--train-bpe", str(a.vocab), "--codec", a.codec, "-q",
                    "--overwrite"])
        if rc:
            raise SystemExit(rc)
    ds = lio.open_dataset(a.data)
    print(f"dataset: {ds.num_tokens:,} tokens, {ds.dtype}, codec {ds.codec}; backend {lio.info()['backend']}")

    torch.manual_seed(0)
    model = GPT(a.vocab, 128, 2, 4, a.seq_len).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = lio.TokenLoader(ds, batch_size=a.batch_size, seq_len=a.seq_len, device=a.device, seed=0)
    step = 0
    if os.path.exists(a.ckpt):
        ck = torch.load(a.ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        loader.load_state_dict(ck["loader"])
        step = ck["step"]
        print(f"resumed at step {step} (loader position {loader.state_dict()['position']})")

    t0 = time.perf_counter()
    it = iter(loader)
    while step < a.steps:
        x, y = next(it)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0 or step == a.steps:
            dt = time.perf_counter() - t0
            st = loader.stats()
            print(f"step {step:4d}  loss {loss.item():.3f}  (uniform {math.log(a.vocab):.2f})  "
                  f"{st['batches'] * a.batch_size * a.seq_len / dt:,.0f} tok/s  stall {st['stall_s'] * 1e3:.1f} ms")
    it.close()
    os.makedirs(os.path.dirname(a.ckpt) or ".", exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict(), "step": step},
               a.ckpt)
    print(f"saved {a.ckpt}; run again with a larger --steps to continue the same stream")


if __name__ == "__main__":
    main()
