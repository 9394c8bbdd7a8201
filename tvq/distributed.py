"""Start-up of one JAX job over several processes (hosts), and agreement between them.

`initialize` joins this process to the job through `jax.distributed.initialize`:
- with an explicit coordinator address, process count and process id (any cluster, or
  several processes on one machine);
- by JAX's own cluster detection when the environment shows there are several
  processes: SLURM with more than one task (`SLURM_NTASKS`), or TVQ_DISTRIBUTED=auto,
  which tpu/launch.sh sets on every worker of a TPU pod slice;
- not at all otherwise: one process, the usual case on a laptop or a single host.

Afterwards `jax.devices()` lists the devices of every process. Every process runs the
same program; only process 0 writes metrics and results.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tvq.model.config import ConfigError

log = logging.getLogger(__name__)

# Set to "auto" to let JAX detect the cluster (TPU pod, SLURM, Open MPI, Kubernetes).
AUTO_ENV = "TVQ_DISTRIBUTED"


def detected_cluster() -> str | None:
    """Name the multi-process environment this process runs in, or None for one process."""
    if os.environ.get(AUTO_ENV) == "auto":
        return f"{AUTO_ENV}=auto"
    try:
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        slurm_tasks = 1
    if slurm_tasks > 1 and "SLURM_JOB_ID" in os.environ:
        return f"SLURM job {os.environ['SLURM_JOB_ID']} with {slurm_tasks} tasks"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join the JAX job of several processes, if there is one (see the module doc).

    Call before anything else uses JAX. Raises ConfigError on an incomplete or
    inconsistent set of explicit settings.
    """
    explicit = {
        "--coordinator-address": coordinator_address,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [name for name in explicit if name not in given]
        raise ConfigError(
            f"{', '.join(given)} given without {', '.join(missing)}; pass all three to "
            "start a job of several processes, or none"
        )

    import jax

    if given:
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process-id {process_id} is outside 0 .. {num_processes - 1}; number the "
                "processes from 0"
            )
        if ":" not in coordinator_address:
            raise ConfigError(
                f"--coordinator-address {coordinator_address!r} has no port; give HOST:PORT"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        source = f"coordinator {coordinator_address}"
    else:
        cluster = detected_cluster()
        if cluster is None:
            return
        jax.distributed.initialize()
        source = cluster
    log.info(
        "process %d of %d joined the job (%s): %d local and %d global devices",
        jax.process_index(), jax.process_count(), source, jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """True in process 0, the one process that writes metrics and results."""
    import jax

    return jax.process_index() == 0


def agreed_value(value: int) -> int:
    """Return process 0's value in every process (the value itself with one process)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def any_process(flag: bool) -> bool:
    """Return True in every process if the flag is set in any of them."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
