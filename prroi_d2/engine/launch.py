"""``launch``: Detectron2's multi-process launcher, extended to machines without a GPU (gloo, CPU DDP)."""

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = ["launch"]


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_machines * num_gpus_per_machine`` processes, as Detectron2's ``launch``.

    With CUDA: Detectron2's own ``launch`` (one process per GPU, NCCL). Without CUDA, ``num_gpus_per_machine`` is the
    number of CPU processes per machine: they join a gloo process group and Detectron2's trainer wraps the model in
    a CPU ``DistributedDataParallel``. One process (or 0 GPUs) runs ``main_func`` in this process.
    """
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size <= 1:
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url must name the first machine (tcp://HOST:PORT) when num_machines > 1")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, processes_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * processes_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    if hasattr(comm, "create_local_process_group"):  # Detectron2 after v0.6
        comm.create_local_process_group(processes_per_machine)
    else:
        for machine in range(world_size // processes_per_machine):
            ranks = list(range(machine * processes_per_machine, (machine + 1) * processes_per_machine))
            group = dist.new_group(ranks)
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # Detectron2's trainer passes device_ids=[local rank] to DistributedDataParallel, which CPU modules reject.
    create_ddp_model = defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return create_ddp_model(model, **kwargs)

    defaults.create_ddp_model = create_cpu_ddp_model
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
