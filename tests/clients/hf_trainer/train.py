"""A Hugging Face Trainer run as its users write one: a tiny randomly initialised GPT-2, a token
data set made here, TrainingArguments from the command line (HfArgumentParser). Run it under
torchrun; the Trainer picks DDP (gloo on CPU) itself. Nothing is downloaded.

    torchrun --nproc_per_node 2 train.py --output_dir /tmp/hf --max_steps 20 \
        --per_device_train_batch_size 8 --use_cpu --report_to none
"""

import json
import os
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class Clock(TrainerCallback):
    """The client's own clock (rank 0, when CLIENT_CLOCK names a file): each optimizer step's end
    and each loss the Trainer logs, as JSON lines."""

    def __init__(self, path: str) -> None:
        self.out = open(path, "w")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.out.write(json.dumps({"step": state.global_step, "t": time.perf_counter()}) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        if logs and "loss" in logs:
            self.out.write(json.dumps({"step": state.global_step, "loss": float(logs["loss"])}) + "\n")
        self.out.flush()


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; labels are the inputs (the model shifts them)."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    clock = os.environ.get("CLIENT_CLOCK")
    callbacks = [Clock(clock)] if clock and args.process_index == 0 else []
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(4096, 128, config.vocab_size), callbacks=callbacks
    )
    trainer.train()


if __name__ == "__main__":
    main()
