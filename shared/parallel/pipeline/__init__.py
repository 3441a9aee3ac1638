"""Pipeline parallelism: schedules as data, a validator, a simulator, and runtimes on
torch.distributed (runtime.py) and JAX (jax_pipeline.py). See labs/pipeline-parallel.ipynb."""

from shared.parallel.pipeline.schedules import SCHEDULES, Action, Schedule, make_schedule
from shared.parallel.pipeline.simulate import Simulation, simulate
from shared.parallel.pipeline.validate import validate

__all__ = ["SCHEDULES", "Action", "Schedule", "Simulation", "make_schedule", "simulate",
           "validate"]
