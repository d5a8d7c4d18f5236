"""nanoGPT's training loop (karpathy/nanoGPT train.py, MIT, see LICENSE) on its own model.py, kept
as written, with what a CPU run under torchrun needs: its DDP set-up picks the CPU (the original
calls torch.cuda.set_device), its config comes from flags instead of configurator.py, and the loss
it prints is the mean over the micro-steps (the original prints the last one, "approximating").
Its data is train.bin as nanoGPT's prepare.py writes it (uint16 tokens), made here at random.

    torchrun --nproc_per_node 2 train.py --max-iters 20 [--grad-accum 4] [--threads 4]
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from model import GPT, GPTConfig
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

p = argparse.ArgumentParser()
p.add_argument("--max-iters", type=int, default=20)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--block-size", type=int, default=128)
p.add_argument("--grad-accum", type=int, default=4, help="over all ranks, as nanoGPT's")
p.add_argument("--log-interval", type=int, default=1)
p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave it)")
p.add_argument("--data-dir", default=os.environ.get("NANOGPT_DATA", "/tmp/nanogpt-data"))
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
batch_size, block_size, gradient_accumulation_steps = a.batch_size, a.block_size, a.grad_accum
learning_rate, weight_decay, beta1, beta2, grad_clip = 6e-4, 1e-1, 0.9, 0.95, 1.0
device, device_type = "cpu", "cpu"

ddp = int(os.environ.get("RANK", -1)) != -1  # is this a ddp run?
if ddp:
    init_process_group(backend="gloo")
    ddp_rank = int(os.environ["RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    master_process = ddp_rank == 0
    seed_offset = ddp_rank
    assert gradient_accumulation_steps % ddp_world_size == 0
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process, seed_offset, ddp_world_size = True, 0, 1
torch.manual_seed(1337 + seed_offset)

data_dir = a.data_dir
if master_process and not os.path.exists(os.path.join(data_dir, "train.bin")):
    os.makedirs(data_dir, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, 512, 200_000, dtype=np.uint16)
    tokens.tofile(os.path.join(data_dir, "train.bin.tmp"))
    os.replace(os.path.join(data_dir, "train.bin.tmp"), os.path.join(data_dir, "train.bin"))
if ddp:
    torch.distributed.barrier()


def get_batch(split):
    # as nanoGPT: a new memmap every batch, and the rows indexed with tensor elements
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x.to(device), y.to(device)


model = GPT(
    GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=block_size, vocab_size=512, dropout=0.0, bias=False)
)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=False)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if ddp:
    model = DDP(model)

clock_path = os.environ.get("CLIENT_CLOCK")
clock = open(clock_path, "w") if clock_path and master_process else None
X, Y = get_batch("train")
t0 = time.time()
iter_num = 0
while True:
    loss_sum = 0.0
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        logits, loss = model(X, Y)
        loss = loss / gradient_accumulation_steps
        X, Y = get_batch("train")
        scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % a.log_interval == 0 and master_process:
        lossf = loss_sum.item()
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms")
        if clock:
            clock.write(json.dumps({"step": iter_num + 1, "t": time.perf_counter(), "loss": lossf}) + "\n")
            clock.flush()
    iter_num += 1
    if iter_num >= a.max_iters:
        break

if ddp:
    destroy_process_group()
