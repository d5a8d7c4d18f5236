"""``torchrun --nproc_per_node N -m perfkit.trainer --config tiny-cpu --set parallel.tp=2``"""

from perfkit.trainer.cli import main

main()
