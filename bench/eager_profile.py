"""cProfile of one eager mixed step's host side (a tuning aid)."""
import cProfile
import pstats

import torch

from bench import engine, step_profile
from engine.config import resolve_device

runner = engine.build_runner("gpt2-medium", resolve_device("auto"), torch.bfloat16, num_blocks=8192, max_batch=128)
engine.warm_up(runner)
step_profile.eager_step_launch_share(runner)
pr = cProfile.Profile()
pr.enable()
step_profile.eager_step_launch_share(runner)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
