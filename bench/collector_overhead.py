"""What profiling costs a training step: everything perfkit adds, in both ways it attaches.

    python bench/collector_overhead.py --repeats 8 --steps 100            # both modes
    python bench/collector_overhead.py --mode hook --repeats 4

- **manual**: the bundled trainer, which marks its own steps (``perfkit.attach()``/``step()``):
  plain ``perfkit train`` against ``perfkit profile -- reference``.
- **hook**: an unmodified DDP script (a small transformer, a DataLoader, AdamW; it knows nothing of
  perfkit and times its own steps): plain ``torchrun script.py`` against ``perfkit profile --
  torchrun script.py``, where the collectors attach through ``sitecustomize`` and find the steps
  from optimizer-step, module, autograd and DataLoader hooks.

Every collector runs but the kernel window and the allocator history (opt-in diagnostics). Plain
and profiled runs alternate, so drift on a shared machine hits both alike. Each run gives the
median of its own per-step times after the warm-up; each pair a ratio profiled/plain; the result
is their geometric mean with a 95% t interval over the pairs (``perfkit.optimizer.trials``, the
statistic the optimizer decides with). Target: at most 1.01.

Beside it, measured in place on every step of the profiled runs: perfkit's own thread CPU time
inside the step end (collectors, writing, collective records; ``perfkit_s`` in rank<N>/steps.jsonl)
as a share of the step. That figure leaves out the time spent in perfkit's wrappers and hooks while
the step runs (phase marks, collective wrappers, DDP's Python comm hook, module and autograd hooks,
the io and cpu collectors, the watchdog thread); the A/B ratio includes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from perfkit.optimizer.trials import Candidate, Measurement, ratio_interval

WARMUP = 5
COLLECT = "steps,comms,cpu,memory,io,nvml"

SCRIPT = """
import json, os, sys, time, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

steps, seq, vocab, d = int(sys.argv[1]), 64, 256, 64
dist.init_process_group("gloo")
torch.manual_seed(0)
torch.set_num_threads(1)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, vocab)
    def forward(self, x):
        return self.head(self.body(self.emb(x)))
model = DDP(Net())
data = TensorDataset(torch.randint(0, vocab, (steps * 8 * dist.get_world_size(), seq + 1)))
loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
times, last = [], time.perf_counter()
for (batch,) in loader:
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    now = time.perf_counter()
    times.append(now - last)
    last = now
if dist.get_rank() == 0:
    with open(os.environ["BENCH_STEP_TIMES"], "w") as f:
        json.dump(times, f)
dist.barrier()  # gloo can abort a rank whose peer tore down first
dist.destroy_process_group()
"""


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def from_log(log: Path) -> list[float]:
    return [json.loads(line)["step_time_s"] * 1e3 for line in log.read_text().splitlines()][WARMUP:]


def self_share(out: Path, nproc: int) -> float:
    """The busiest rank's median in-place share (perfkit_s / step_time_s)."""
    shares = []
    for r in range(nproc):
        rows = [json.loads(x) for x in (out / f"rank{r}" / "steps.jsonl").read_text().splitlines()][WARMUP:]
        shares.append(statistics.median(x["perfkit_s"] / x["step_time_s"] for x in rows if x["perfkit_s"]))
    return max(shares)


WATCH = False
"""--watch: the profiled runs watch (perfkit profile --watch: its own collectors, the watcher)."""


def profile_cmd(out: Path, nproc: int) -> list[str]:
    what = ["--watch"] if WATCH else ["--collect", COLLECT, "--profile-steps", "none"]
    return [
        sys.executable, "-m", "perfkit", "profile", "--out", str(out), *what, "--nproc", str(nproc), "--",
    ]  # fmt: skip


def pair_manual(args: argparse.Namespace, tmp: Path, i: int, env: dict[str, str]) -> tuple[list, list, float]:
    sets = [f"steps={args.steps}", "log_every=1", *args.sets]
    set_args = [a for s in sets for a in ("--set", s)]
    log = tmp / f"plain{i}.jsonl"
    base = [sys.executable, "-m", "perfkit", "train", "--config", args.config, "--nproc", str(args.nproc)]
    run([*base, "--log-json", str(log), *set_args], env)
    out = tmp / f"manual{i}"
    run([*profile_cmd(out, args.nproc), "reference", "--config", args.config, *set_args], env)
    return from_log(log), from_log(out / "train_log.jsonl"), self_share(out, args.nproc)


def pair_hook(args: argparse.Namespace, tmp: Path, i: int, env: dict[str, str]) -> tuple[list, list, float]:
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    torchrun += ["--standalone", str(script), str(args.steps)]
    times = tmp / f"times{i}.json"
    run(torchrun, {**env, "BENCH_STEP_TIMES": str(times)})
    plain = [t * 1e3 for t in json.loads(times.read_text())][WARMUP:]
    out = tmp / f"hook{i}"
    run([*profile_cmd(out, args.nproc), *torchrun], {**env, "BENCH_STEP_TIMES": str(times)})
    profiled = [t * 1e3 for t in json.loads(times.read_text())][WARMUP:]
    return plain, profiled, self_share(out, args.nproc)


def measure(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    plain, profiled = Candidate("plain", []), Candidate("profiled", [])
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            fn = pair_manual if mode == "manual" else pair_hook
            a, b, share = fn(args, Path(tmp), i, env)
            for cand, samples in ((plain, a), (profiled, b)):
                cand.runs.append(Measurement(ok=True, step_ms=statistics.median(samples), samples_ms=samples))
            shares.append(share)
            print(
                f"  {mode} pair {i + 1}: plain {plain.runs[-1].step_ms:.2f} ms/step, profiled "
                f"{profiled.runs[-1].step_ms:.2f} ms/step, ratio {profiled.runs[-1].step_ms / plain.runs[-1].step_ms:.3f}",
                flush=True,
            )
    interval = ratio_interval(plain, profiled)
    assert interval is not None
    point, (lo, hi) = interval
    pairs = [v.step_ms / b.step_ms for b, v in zip(plain.runs, profiled.runs, strict=True)]  # type: ignore[operator]
    return {
        "mode": mode,
        "plain_ms": statistics.median(r.step_ms for r in plain.runs),  # type: ignore[type-var]
        "profiled_ms": statistics.median(r.step_ms for r in profiled.runs),  # type: ignore[type-var]
        "ratio": point,
        "interval": [lo, hi],
        "pairs": pairs,
        "self_time_share_median": statistics.median(shares),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("manual", "hook", "both"), default="both")
    ap.add_argument("--config", default="tiny-cpu", help="the bundled trainer's configuration (manual mode)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="trainer overrides (manual mode)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--watch", action="store_true", help="profile with perfkit profile --watch")
    args = ap.parse_args()
    global WATCH
    WATCH = args.watch
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    results = []
    for mode in ("manual", "hook") if args.mode == "both" else (args.mode,):
        r = measure(mode, args, env)
        results.append(r)
        print(
            f"{mode}: profiled / plain step time {r['ratio']:.3f}x, 95% interval {r['interval'][0]:.3f}-"
            f"{r['interval'][1]:.3f} over {args.repeats} pairs (single pairs {min(r['pairs']):.3f}-"
            f"{max(r['pairs']):.3f}; {r['profiled_ms']:.2f} vs {r['plain_ms']:.2f} ms/step); "
            f"perfkit's own time at step end, in place: {r['self_time_share_median']:.2%} of the step",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
