"""Process-group setup for `torchrun --nproc_per_node N` and FSDP2 sharding (torch.distributed.fsdp.fully_shard).

One process (plain `python -m ...`) gives world size 1 and no process group; under torchrun the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts one with NCCL on CUDA and gloo on
CPU. Each transformer block is its own FSDP2 unit, then the root (embeddings, final norm, lm_head),
which is the usual per-block wrapping: one block's parameters are gathered at a time.

FSDP2 averages gradients over ranks; trainers therefore scale each rank's loss so that the average
equals the loss over the global batch (see train/lm.py), and a run with N processes takes the same
optimizer steps as a 1-process run over the same global batch.

Checkpoints hold full (unsharded) state dicts written by rank 0, so a run saved with N processes
resumes with any other N, and the model files are ordinary `save_pretrained` folders. On resume every
rank reads the full files and keeps its shard (simple; for very large models a sharded
torch.distributed.checkpoint format would avoid the full copy per rank: not done yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local)


def close(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(model: torch.nn.Module, units, info: DistInfo, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: each module in `units` becomes one sharded unit, then the root. With param_dtype (bf16
    on GPU) parameters are gathered in that dtype and gradients reduced in fp32."""
    if not info.active:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: torch.nn.Module) -> dict:
    """The full model state dict on CPU (complete on rank 0; empty on the others when sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_opts(cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The full optimizer state of `model`'s parameters on CPU, keyed by parameter name, so it loads
    into a run with a different number of processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_opts(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state (every rank passes the same full dict; each keeps its own shard)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_opts())
