"""The bundled reference parallel trainer: a GPT under DP, ZeRO/FSDP, TP, PP and their combinations.

``perfkit.trainer.config`` is torch-free (the CLI validates a configuration before any process
starts); the model, parallelization and loop import torch.
"""
