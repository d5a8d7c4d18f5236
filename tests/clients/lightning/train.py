"""A PyTorch Lightning run as its users write one: a LightningModule (a small causal transformer),
its DataLoader, and Trainer(strategy="ddp") on CPU. Run it under torchrun: Lightning reads the
ranks from torchrun's environment. Nothing is downloaded.

    torchrun --nproc_per_node 2 train.py --max-steps 20 [--accumulate 2] [--workers 0]
        [--strategy ddp_find_unused_parameters_true] [--decode-ms 2]
"""

import argparse
import json
import os
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
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


class Clock(pl.Callback):
    """The client's own clock (rank 0, when CLIENT_CLOCK names a file): each optimizer step's end
    and the loss the module logged there, as JSON lines."""

    def __init__(self, path: str) -> None:
        self.out = open(path, "w")
        self.last = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_rank == 0 and trainer.global_step != self.last:  # an optimizer step ended
            self.last = trainer.global_step
            loss = trainer.callback_metrics.get("train_loss")
            row = {"step": trainer.global_step, "t": time.perf_counter()}
            if loss is not None:
                row["loss"] = float(loss)
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()


class LM(pl.LightningModule):
    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, seq: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--decode-ms", type=float, default=0.0)
    a = p.parse_args()
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        Tokens(4096, 128, 512, a.decode_ms), batch_size=a.batch, shuffle=True, num_workers=a.workers
    )
    clock = os.environ.get("CLIENT_CLOCK")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        strategy=a.strategy,
        callbacks=[Clock(clock)] if clock else [],
        max_steps=a.max_steps,
        accumulate_grad_batches=a.accumulate,
        log_every_n_steps=a.log_every,
        enable_checkpointing=False,
        logger=False,
        enable_model_summary=False,
    )
    trainer.fit(LM(), loader)


if __name__ == "__main__":
    main()
