"""cProfile of one eager (uncaptured) mixed step's host side, on gpt2-medium (GPU only)."""
import cProfile
import pstats

import torch

from bench import engine, step_profile
from engine.device import resolve_device


def main() -> None:
    runner = engine.build_runner("gpt2-medium", resolve_device("auto"), torch.bfloat16, num_blocks=8192,
                                 max_batch=128)
    engine.warm_up(runner)
    step_profile.eager_step_launch_share(runner)
    profile = cProfile.Profile()
    profile.enable()
    step_profile.eager_step_launch_share(runner)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
