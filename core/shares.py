"""Which share of a cohort's slides this process does: the slide mode of Extract_Features.py and
Select_Tiles.py split their slides the same way, so that a job array gives each slide to one process."""
import os

from core.errors import UserError


def process_share(environ=None):
    """(index, count): this process's place among all processes of the run. torchrun's RANK/WORLD_SIZE
    and a SLURM job array's task combine: the array's tasks each run WORLD_SIZE processes."""
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        offset = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        task, tasks = offset // max(1, int(env.get("SLURM_ARRAY_TASK_STEP", 1))), int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    except ValueError as err:
        raise UserError(f"cannot read this process's place from the environment ({err}): check RANK, "
                        "WORLD_SIZE and SLURM_ARRAY_TASK_ID/_MIN/_COUNT") from None
    if not (0 <= rank < world and 0 <= task < tasks):
        raise UserError(f"RANK={rank} of WORLD_SIZE={world}, SLURM array task {task} of {tasks}: out of range; "
                        "check RANK, WORLD_SIZE and SLURM_ARRAY_TASK_ID/_MIN/_STEP/_COUNT")
    return task * world + rank, tasks * world
