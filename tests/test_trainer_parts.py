"""Model, data and helpers of the trainer, in one process."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perfkit.hardware import gpu_peak_tflops
from perfkit.trainer.config import ModelConfig, flops_per_token, load_config
from perfkit.trainer.data import TokenBatches, synthetic_corpus
from perfkit.trainer.model import GPT, num_params
from perfkit.trainer.train import lr_at

DATA = Path(__file__).parent / "data"


def test_flops_per_token_matches_the_h100_capture() -> None:
    capture = json.loads((DATA / "h100" / "capture.json").read_text())
    m = capture["model"]
    cfg = ModelConfig(
        vocab_size=m["vocab"],
        d_model=m["d_model"],
        n_heads=m["heads"],
        n_layers=m["layers"],
        seq_len=m["seq"],
    )
    assert flops_per_token(cfg) == capture["tuned"]["flops_per_token"]


def test_eager_and_sdpa_attention_agree() -> None:
    cfg = load_config("tiny-cpu").model
    torch.manual_seed(0)
    eager = GPT(cfg, "eager")
    torch.manual_seed(0)
    sdpa = GPT(cfg, "sdpa")
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    torch.testing.assert_close(eager(x), sdpa(x), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_keeps_gradients() -> None:
    cfg = load_config("tiny-cpu").model
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg, activation_checkpointing=ac)
        x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
        model(x).sum().backward()
        grads.append(model.layers["0"].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_tied_embeddings_share_one_tensor() -> None:
    cfg = ModelConfig(tie_embeddings=True)
    model = GPT(cfg)
    assert model.head is not None and model.tok_emb is not None
    assert model.head.weight is model.tok_emb.weight
    assert num_params(model) == num_params(GPT(ModelConfig())) - cfg.vocab_size * cfg.d_model


def test_causal_attention_ignores_the_future() -> None:
    cfg = load_config("tiny-cpu").model
    model = GPT(cfg, "eager")
    x = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(x)[0, :-1], model(y)[0, :-1])


def test_corpus_is_deterministic_and_structured(tmp_path: Path) -> None:
    a = synthetic_corpus(256, 50_000, seed=1, folder=tmp_path / "a")
    b = synthetic_corpus(256, 50_000, seed=1, folder=tmp_path / "b")
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size == 100_000
    tokens = torch.from_numpy(np.fromfile(a, dtype="<u2").astype("int64"))
    assert int(tokens.max()) < 256
    # Learnable: the next token is far more predictable than uniform (bigram entropy well below 8 bits).
    pairs = tokens[:-1] * 256 + tokens[1:]
    counts = torch.bincount(pairs, minlength=256 * 256).float().view(256, 256)
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    h = -(counts * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum() / counts.sum()
    assert h < 5.0
    assert not list(tmp_path.glob("*/*.tmp"))


def test_data_parallel_slices_make_the_global_batch(tmp_path: Path) -> None:
    path = synthetic_corpus(256, 20_000, folder=tmp_path)
    whole = TokenBatches(path, seq_len=16, global_batch=8, local_batch=8, dp_rank=0, seed=3)
    halves = [
        TokenBatches(path, seq_len=16, global_batch=8, local_batch=4, dp_rank=r, seed=3) for r in (0, 1)
    ]
    for step in (0, 5):
        torch.testing.assert_close(torch.cat([h[step] for h in halves]), whole[step])
        assert whole[step].shape == (8, 17) and whole[step].dtype == torch.int64
    assert not torch.equal(whole[0], whole[1])


def test_lr_schedule() -> None:
    cfg = load_config("tiny-cpu", ["steps=20", "optimizer.warmup_steps=5", "optimizer.lr=1.0"])
    assert lr_at(cfg, 0) == pytest.approx(0.2)
    assert lr_at(cfg, 4) == pytest.approx(1.0)
    assert lr_at(cfg, 19) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(4, 19))


def test_gpu_peaks() -> None:
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("Some CPU") is None
