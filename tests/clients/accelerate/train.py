"""A Hugging Face Accelerate loop as its users write one: Accelerator() prepares a model, optimizer
and DataLoader; accelerator.backward and accumulate do the rest. Run it under torchrun on CPU
(Accelerate picks gloo). Nothing is downloaded.

    torchrun --nproc_per_node 2 train.py --steps 20 [--accumulate 2] [--workers 0] [--decode-ms 2]
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; ``decode_ms`` of work per sample stands for reading and decoding."""

    def __init__(self, n: int, seq: int, vocab: int, decode_ms: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.decode_s = decode_ms / 1e3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decode_s:
            time.sleep(self.decode_s)
        return self.ids[i, :-1], self.ids[i, 1:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--decode-ms", type=float, default=0.0)
    a = p.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=a.accumulate)
    torch.manual_seed(0)
    model = LM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loader = torch.utils.data.DataLoader(
        Tokens(4096, 128, 512, a.decode_ms), batch_size=a.batch, shuffle=True, num_workers=a.workers
    )
    clock = os.environ.get("CLIENT_CLOCK")  # the client's own clock, as JSON lines (rank 0)
    out = open(clock, "w") if clock and accelerator.is_main_process else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    done = 0
    while done < a.steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                done += 1
                value = loss.item()
                accelerator.print(f"step {done} loss {value:.4f}")
                if out:
                    out.write(json.dumps({"step": done, "t": time.perf_counter(), "loss": value}) + "\n")
                    out.flush()
                if done >= a.steps:
                    break


if __name__ == "__main__":
    main()
