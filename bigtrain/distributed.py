"""Distributed start-up under the DeepSpeed launcher, torchrun, mpirun or a plain single process.

One rank grid, described twice: megatron-core's ``parallel_state`` (its tensor-parallel layers use it)
and DeepSpeed's ``PipeModelDataParallelTopology`` (its pipeline engine uses it). Both order ranks
tensor-fastest, then data, then pipeline; :func:`init_distributed` checks they agree on every rank.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from bigtrain import compat
from bigtrain.config import Config, ConfigError

_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def adopt_slurm_env() -> None:
    """``srun python -m bigtrain.pretrain`` (one task per GPU, see launch/slurm.sbatch): Slurm's task
    variables become torch's, so Slurm's own signals (``--signal=USR1@300``) reach every rank directly.
    Never overrides another launcher's variables."""
    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env or _launched_by_mpi():
        return
    if int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "MASTER_ADDR" not in env:
        raise RuntimeError(
            "srun: export MASTER_ADDR (the first node's address) before srun; see launch/slurm.sbatch"
        )
    env.update(
        RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0")
    )
    env.setdefault("MASTER_PORT", "29500")


def world_size_from_env() -> int:
    """World size as the launcher announces it, readable before any process group exists."""
    adopt_slurm_env()
    if os.environ.get("OMPI_COMM_WORLD_SIZE") and "TORCHELASTIC_RUN_ID" not in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])  # mpirun outranks inherited variables
    for var in _SIZE_VARS:
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def rank_from_env() -> int:
    adopt_slurm_env()
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dist:
    """Where this process sits in the grid."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_rank: int
    pp_rank: int
    dp_rank: int  # among the ranks that read different samples (context-parallel ranks share one)
    topology: object  # deepspeed PipeModelDataParallelTopology (its data axis spans data x context)
    cp_rank: int = 0  # which chunk of each sample's sequence this rank holds (parallel.context)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_weights(self) -> bool:
        """The one rank of its tensor/pipeline place that writes the weights: data and context rank 0
        (the others hold the same)."""
        return self.dp_rank == 0 and self.cp_rank == 0


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def check_accelerator(cfg: Config, device: torch.device) -> None:
    """DeepSpeed picks its accelerator once, at import (CUDA when a GPU is visible): a CPU run on a GPU
    machine would get its engine moved to the GPU while bigtrain feeds CPU batches. Say so up front."""
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator().device_name()
    if chosen != device.type:
        raise RuntimeError(
            f"train.device={cfg.train.device} runs on {device.type}, but DeepSpeed chose its {chosen} "
            f"accelerator: set DS_ACCELERATOR={device.type} in the environment"
            + (" (or CUDA_VISIBLE_DEVICES= to hide the GPUs)" if device.type == "cpu" else "")
        )


def precision_supported(precision: str, device: torch.device) -> bool:
    """Whether DeepSpeed's accelerator for ``device`` trains in ``precision`` on this host. DeepSpeed
    refuses an unsupported half precision only after start-up (``ValueError: Type fp16 is not supported
    on your device``); its CPU accelerator asks oneDNN, which has fp16 only on processors with
    AVX512-FP16/AMX-FP16 (not on e.g. AMD EPYC Zen 4), and its CUDA accelerator asks the GPU's compute
    capability (bf16 needs Ampere or newer). A host whose accelerator is not ``device`` (see
    ``check_accelerator``) is not asked."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if precision == "fp32" or accelerator.device_name() != device.type:
        return True
    ask = accelerator.is_fp16_supported if precision == "fp16" else accelerator.is_bf16_supported
    # asked before set_device: about this rank's GPU, not GPU 0
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return bool(ask())


def check_precision(cfg: Config) -> None:
    """Refuse (ConfigError, one line naming the field and what runs instead) a ``precision`` this host
    cannot train in, before any process group exists."""
    try:
        device = pick_device(cfg)
    except RuntimeError:  # no such device: init_distributed says so
        return
    if precision_supported(cfg.precision, device):
        return
    others = [p for p in ("bf16", "fp16", "fp32") if p != cfg.precision and precision_supported(p, device)]
    raise ConfigError(
        f"precision: {cfg.precision} is not supported by DeepSpeed's {device.type} accelerator on this "
        f"host ({_processor_name(device)}); use " + " or ".join(f"precision={p}" for p in others)
    )


def _processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def init_distributed(cfg: Config) -> Dist:
    """Create the default process group (NCCL on GPU, gloo on CPU) and both views of the rank grid.
    Raises ``compat.VersionMismatch`` first when deepspeed/megatron-core are not the targeted minors."""
    compat.check_versions()
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    mpi_rank, mpi_size = os.environ.get("OMPI_COMM_WORLD_RANK"), os.environ.get("OMPI_COMM_WORLD_SIZE")
    if mpi_size and (os.environ.get("RANK"), os.environ.get("WORLD_SIZE")) != (mpi_rank, mpi_size):
        # mpirun, with RANK/WORLD_SIZE absent or inherited from elsewhere: MPI (mpi4py) decides
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(var, None)
    elif not _launched_by_mpi() and "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = pick_device(cfg)
    check_accelerator(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=cfg.train.dist_timeout_minutes)
    # Groups created later without an explicit timeout (DeepSpeed's pipeline and data-parallel groups)
    # get torch's 30-minute default, not the world's: make the configured timeout the default.
    compat.default_group_timeout(timeout)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=True,
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),  # mpirun: pass -x MASTER_PORT
        timeout=timeout,
        verbose=False,
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tp, pp, cp = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=cfg.parallel.expert,
        expert_tensor_parallel_size=tp,
        distributed_timeout_minutes=cfg.train.dist_timeout_minutes,  # timedelta(minutes=...) accepts floats
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=False,
    )
    if cfg.parallel.sequence_parallel:
        compat.megatron_buffers_on(device)
    if cfg.model.moe.num_experts:
        compat.megatron_moe_on(device)
    # DeepSpeed's data axis is megatron's data x context (context varying fastest, as in megatron's
    # "tp-cp-ep-dp-pp" order): the ranks its ZeRO shards and reduces gradients over
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    dist = Dist(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        topology=topology,
        cp_rank=parallel_state.get_context_parallel_rank(),
    )
    coord = topology.get_coord(rank)
    data = dist.dp_rank * cp + dist.cp_rank
    if (coord.pipe, coord.data, coord.model) != (dist.pp_rank, data, dist.tp_rank):
        raise RuntimeError(
            f"rank {rank}: megatron-core grid (pp={dist.pp_rank}, dp={dist.dp_rank}, cp={dist.cp_rank}, "
            f"tp={dist.tp_rank}) differs from DeepSpeed's topology (pp={coord.pipe}, data={coord.data}, "
            f"tp={coord.model})"
        )
    return dist


class MegatronMPU:
    """The model-parallel-unit interface DeepSpeed's engine asks for, answered by megatron-core's
    parallel_state (pipeline = 1 runs; the pipeline engine builds its own grid from the topology).

    Context parallelism is DeepSpeed's "sequence parallel" (Ulysses): its engine and ZeRO shard and
    reduce gradients over the sequence-data-parallel group (megatron's data x context group), summing
    over the context ranks and averaging over the data ranks (``dp_world / sequence_parallel_size``);
    so each context rank's loss is its chunk's share of the sample's (see ``Trainer.next_global_batch``)."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> torch.distributed.ProcessGroup:
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> torch.distributed.ProcessGroup:
        return self.ps.get_data_parallel_group()

    def get_sequence_parallel_rank(self) -> int:
        return self.ps.get_context_parallel_rank()

    def get_sequence_parallel_world_size(self) -> int:
        return self.ps.get_context_parallel_world_size()

    def get_sequence_parallel_group(self) -> torch.distributed.ProcessGroup:
        return self.ps.get_context_parallel_group()

    def get_sequence_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_group(self) -> torch.distributed.ProcessGroup:
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Tear down process groups so the next run in the same process (tests) starts clean."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
