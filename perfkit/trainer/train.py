"""The training loop, readable in one sitting. Run one process per rank under torchrun, or alone.

Per step: wait for data, forward/backward (or one pipeline schedule step), clip, optimizer step,
and every ``log_every`` steps one all-reduce of the loss and a log line on rank 0.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

import perfkit
from perfkit.errors import ConfigError
from perfkit.hardware import gpu_peak_tflops, mfu
from perfkit.trainer.checkpoint import Checkpointer, latest_step
from perfkit.trainer.config import TrainConfig, flops_per_token, resolve_layout
from perfkit.trainer.costs import layout_costs
from perfkit.trainer.data import TokenBatches, make_loader, synthetic_corpus
from perfkit.trainer.model import GPT, cross_entropy, num_params
from perfkit.trainer.parallelize import (
    Parallelized,
    build_mesh,
    clip_grad_norm_,
    no_gradient_sync,
    parallelize,
    reduce_gradients,
)

Phase = Callable[[str], contextlib.AbstractContextManager[None]]


def _no_phase(name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _standalone_env() -> None:
    """Let a plain ``python -m perfkit.trainer`` run as a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use --set device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"use --nproc {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr_ratio × lr at the last step."""
    o = cfg.optimizer
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _forward_backward(
    par: Parallelized, cfg: TrainConfig, batch: torch.Tensor, device: torch.device, phase: Phase
) -> torch.Tensor | None:
    """One optimizer step's forward and backward; returns the mean loss where this rank has it."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.kernels.precision == "bf16")
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if par.schedule is not None:
        losses: list[torch.Tensor] = []
        # The schedule interleaves forward and backward of microbatches: one phase.
        with phase("forward_backward"), autocast:
            if par.has_first_stage:
                par.schedule.step(inputs, target=targets if par.has_last_stage else None, losses=losses)
            elif par.has_last_stage:
                par.schedule.step(target=targets, losses=losses)
            else:
                par.schedule.step()
        return torch.stack(losses).mean().detach() if par.has_last_stage else None
    model = par.parts[0]
    n = par.layout.microbatches
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(zip(inputs.chunk(n), targets.chunk(n))):
        sync = contextlib.nullcontext() if i == n - 1 else no_gradient_sync(par.parts)
        with sync:
            with phase("forward"), autocast:
                loss = cross_entropy(model(x), y) / n
            with phase("backward"):
                loss.backward()
        total += loss.detach()
    return total


def _global_loss(par: Parallelized, loss: torch.Tensor | None, device: torch.device) -> float:
    """The loss averaged over data-parallel ranks, known to every rank: one all-reduce."""
    t = torch.zeros((), device=device)
    # Count each data-parallel replica once: the last pipeline stage, first tensor-parallel rank.
    if loss is not None and par.mesh.get_local_rank("tp") == 0:
        t += loss.float() / par.layout.dp
    dist.all_reduce(t)
    return t.item()


def _final_loss_and_memory(
    par: Parallelized, loss: torch.Tensor | None, device: torch.device
) -> tuple[float, int]:
    """The last step's global loss and the peak memory of the busiest rank (CUDA's max allocated
    on GPU, the process's peak RSS on CPU), in the same single all-reduce (float64: bytes stay
    exact): each rank adds its peak in its own slot."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device)
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = torch.zeros(1 + dist.get_world_size(), dtype=torch.float64, device=device)
    if loss is not None and par.mesh.get_local_rank("tp") == 0:
        t[0] += loss.double() / par.layout.dp
    t[1 + dist.get_rank()] = float(mine)
    dist.all_reduce(t)
    values = t.tolist()
    return values[0], int(max(values[1:]))


def train(cfg: TrainConfig, log_json: Path | None = None, out: IO[str] = sys.stdout) -> list[dict[str, Any]]:
    """Run the configured training in this process (one rank). Returns rank 0's log records."""
    _standalone_env()
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    layout = resolve_layout(cfg, world)
    device = _device(cfg, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, layout, device, rank, log_json, out)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _gc_control(mode: str) -> Iterator[None]:
    """Python's collector for the training loop (TrainConfig.gc), as it was again after."""
    was_enabled = gc.isenabled()
    if mode in ("freeze", "manual"):
        gc.collect()
        gc.freeze()  # the model's, optimizer's and loader's objects: never scanned again
    if mode == "manual":
        gc.disable()
    try:
        yield
    finally:
        if mode in ("freeze", "manual"):
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def _train(
    cfg: TrainConfig, layout: Any, device: torch.device, rank: int, log_json: Path | None, out: IO[str]
) -> list[dict[str, Any]]:
    mesh = build_mesh(layout, device.type)
    torch.manual_seed(cfg.seed)
    # Built on the CPU from the seed on every rank, so every layout starts from the same weights.
    model = GPT(cfg.model, cfg.kernels.attention, cfg.kernels.activation_checkpointing)
    n_params = num_params(model)
    model.to(device)
    par = parallelize(model, cfg, layout, mesh, device)

    corpus = (
        Path(cfg.data.path)
        if cfg.data.path
        else synthetic_corpus(cfg.model.vocab_size, cfg.data.corpus_tokens, cfg.seed)
    )
    if not corpus.is_file():
        raise ConfigError(
            f"data.path={corpus} does not exist; give a uint16 token file or leave data.path empty"
        )
    dataset = TokenBatches(
        corpus,
        seq_len=cfg.model.seq_len,
        global_batch=cfg.data.global_batch,
        local_batch=layout.local_batch,
        dp_rank=par.dp_rank,
        seed=cfg.seed,
        read_delay_s=cfg.data.read_delay_ms / 1e3,
    )

    ckpt = None
    start = 0
    if cfg.checkpoint.dir:
        ckpt = Checkpointer(Path(cfg.checkpoint.dir), par.parts, par.optimizers, cfg.checkpoint.async_save)
        found = latest_step(Path(cfg.checkpoint.dir)) if cfg.checkpoint.resume else None
        if found is not None:
            ckpt.load(found)
            start = found
            if rank == 0:
                print(f"resumed from {cfg.checkpoint.dir} at step {found}", file=out, flush=True)

    loader = make_loader(
        dataset,
        start_step=start,
        steps=cfg.steps,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor,
    )
    tokens_per_step = cfg.data.global_batch * cfg.model.seq_len
    model_flops = flops_per_token(cfg.model)  # a token's training FLOPs, for MFU
    peak = cfg.peak_tflops or (
        gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    log_file: IO[str] | None = open(log_json, "a") if (log_json and rank == 0) else None  # noqa: SIM115
    records: list[dict[str, Any]] = []
    if rank == 0:
        print(
            f"training {n_params / 1e6:.2f}M parameters on {layout.world_size} {device.type} rank(s): "
            f"dp={layout.dp} tp={layout.tp} pp={layout.pp} zero={cfg.parallel.zero} "
            f"global_batch={cfg.data.global_batch} seq={cfg.model.seq_len}",
            file=out,
            flush=True,
        )
    # For the kill tests: SIGKILL this rank at the start of that step (0-based).
    kill_at = int(os.environ.get("PERFKIT_TEST_KILL_AT_STEP", "-1"))
    kill_rank = int(os.environ.get("PERFKIT_TEST_KILL_RANK", "0"))
    local_tokens = layout.local_batch * cfg.model.seq_len
    t_last, step_last = time.perf_counter(), start
    # Under `perfkit profile`: collectors attached, steps marked here through the public API. The
    # loader's workers start inside, so they inherit the attached I/O collector.
    with perfkit.attach(start_step=start) as probe, contextlib.ExitStack() as closing:
        batches = iter(loader)
        if log_file:
            closing.callback(log_file.close)
        perfkit.describe(
            flops_per_token=model_flops,
            parameters=n_params,
            layout={"dp": layout.dp, "tp": layout.tp, "pp": layout.pp},
        )
        phase: Phase = perfkit.phase if probe is not None else _no_phase
        closing.enter_context(_gc_control(cfg.gc))  # after set-up: the loader's workers started
        for step in range(start, cfg.steps):
            with phase("data_wait"):
                batch = next(batches)
            if step == kill_at and rank == kill_rank:
                os.kill(os.getpid(), 9)
            for opt in par.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step)
            loss = _forward_backward(par, cfg, batch.to(device, non_blocking=True), device, phase)
            if par.reduce_after_backward:
                with phase("backward"):
                    reduce_gradients(par.params, par.dp_group)
            with phase("optimizer"):
                grad_norm = clip_grad_norm_(
                    par.params, cfg.optimizer.grad_clip, par.pp_group if layout.pp > 1 else None
                )
                for opt in par.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            done = step + 1
            if cfg.gc == "manual" and done % cfg.gc_every == 0:
                gc.collect(1)  # every rank at the same step: no rank pauses while the others wait
            if ckpt and ((cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.steps):
                with phase("checkpoint"):
                    ckpt.save(done)
            if done % cfg.log_every == 0 or done == cfg.steps:
                peak_memory = None
                if done == cfg.steps:
                    value, peak_memory = _final_loss_and_memory(par, loss, device)
                else:
                    value = _global_loss(par, loss, device)  # syncs the device, so the clock below is true
                now = time.perf_counter()
                step_time = (now - t_last) / (done - step_last)
                t_last, step_last = now, done
                rec = {
                    "step": done,
                    "loss": value,
                    "tokens": tokens_per_step,
                    "step_time_s": step_time,
                    "tokens_per_s": tokens_per_step / step_time,
                    "lr": lr_at(cfg, step),
                    "grad_norm": float(grad_norm),
                }
                utilization = mfu(model_flops, tokens_per_step / step_time, peak, layout.world_size)
                if utilization is not None:
                    rec["mfu"] = utilization
                if peak_memory is not None:
                    rec["peak_memory_bytes"] = peak_memory
                if rank == 0:
                    records.append(rec)
                    print(
                        f"step {done:>5}  loss {value:.4f}  {rec['tokens_per_s']:>10.0f} tok/s  "
                        f"{step_time * 1e3:8.1f} ms/step",
                        file=out,
                        flush=True,
                    )
                    if log_file:
                        log_file = _log(log_file, rec)
            if probe is not None:
                perfkit.step(tokens=local_tokens, loss=loss)
        if ckpt:
            ckpt.wait()
        if probe is not None:
            # the link with nothing else running, for whatif and sweep predictions; and what other
            # layouts of this model would cost here beyond their FLOPs, for the same
            if perfkit.probe_links():
                with perfkit.probing():
                    try:
                        costs = layout_costs(cfg, layout.micro_batch, device)
                    except (RuntimeError, torch.OutOfMemoryError) as e:  # the job's result stands
                        costs = {}
                        print(
                            f"[rank {rank}] perfkit: the layout costs were not measured: {e}", file=sys.stderr
                        )
                    perfkit.describe(layout_costs=costs)
    if rank == 0 and records:
        timed = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
        median = sorted(timed)[len(timed) // 2]
        line = f"done: {cfg.steps} steps, median {median * 1e3:.1f} ms/step, {tokens_per_step / median:.0f} tok/s"
        if peak:
            per_gpu = mfu(model_flops, tokens_per_step / median, peak, layout.world_size)
            line += f", MFU {per_gpu:.1%} of {peak:g} TFLOP/s a GPU"
        if "peak_memory_bytes" in records[-1]:
            what = "max allocated" if device.type == "cuda" else "peak RSS"
            line += f", {what} {records[-1]['peak_memory_bytes'] / 2**20:,.0f} MiB (busiest rank)"
        print(line, file=out, flush=True)
    return records


def _log(log_file: IO[str], rec: dict[str, Any]) -> IO[str] | None:
    """Append one record to the log; a log that cannot be written (a full disk) is said once and
    given up, and training goes on."""
    try:
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        return log_file
    except OSError as e:
        said = (
            f"warning: the log {log_file.name} cannot be written ({e.strerror}); training goes on without it"
        )
        print(said, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            log_file.close()
        return None
