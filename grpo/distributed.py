"""Data parallelism across processes started by torchrun, and FSDP2 for full fine-tuning.

    torchrun --nproc_per_node 2 -m grpo.train --model tiny --max-steps 20 --out runs/dp        # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m grpo.train --init CKPT --out /shared/runs/grpo       # per machine

One process per GPU (or several CPU processes): rank r of N.  torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; `distributed_run` opens the process group from them
(NCCL on GPUs, gloo on the CPU) and does nothing at all in a plain `python -m ...` run.

How one optimizer step is split (both trainers):

- Work: the step's global list of prompts (GRPO) or micro-batches (SFT) is the same on every
  rank (seeded); rank r takes the contiguous slice `shard_bounds(total, r, N)`.  A GRPO rank
  samples and scores *complete groups* for its prompts, so group means and stds are exact; the
  rewards [B_r, G] of every rank are all-gathered into [B, G] before the advantages (the batch
  std of scale_rewards="batch" and the logged reward statistics are global).
- Loss normaliser: the step's totals (sequences and loss tokens for GRPO, loss tokens for SFT)
  are all-reduced (sum) *before* the first backward, so each rank's loss is its share of the
  global loss, L = sum_r L_r.
- Gradients: therefore the gradient of L is the *sum* of the ranks' gradients.  After all
  micro-batches of a step, `sum_gradients` all-reduces (sum) every trainable parameter's .grad
  once, in buckets.  No DDP wrapper and no per-micro-batch hooks: one explicit collective per
  optimizer step is the whole of data parallelism here, and gradient accumulation stays exactly
  one large batch.  Clipping and the optimizer step then run on identical gradients, so the
  replicas stay identical (they start identical: `broadcast_parameters` from rank 0).
- Decisions that change control flow (a non-finite loss on any rank, a stop signal on any rank)
  are agreed with `any_rank`, so every rank takes the same branch and no collective is left
  waiting.
- Rank 0 alone writes the run directory (logs, metrics, checkpoints); the other ranks wait at
  a barrier and every rank resumes from the same checkpoint.

Randomness: nothing random depends on the rank layout.  GRPO samples each rollout chunk with a
generator seeded from (seed, step, position of the chunk's first prompt in the step) and every
step reseeds torch's global stream from (seed, step, rank) (dropout), both with
grpo.runtime.derived_seed; no generator state is saved per rank, a resumed run re-derives it.

Why no DistributedDataParallel: DDP all-reduces during every backward (or, with no_sync, during
the last one) and averages; here one explicit sum after the last micro-batch says the same thing
in one line, keeps the normaliser logic in one place, and works unchanged for LoRA (tiny
gradients) and replicated full fine-tuning.  DDP's overlap of communication with the backward
matters for large replicated models, which is what FSDP is for.

FSDP2 (`--fsdp`, full fine-tuning only): `shard_model` applies `fully_shard` to every decoder
layer, then to the decoder itself (the root unit: embedding and final norm), and to an untied
output head on its own; a head tied to the embedding is replaced by `TiedHead`, which reads the
embedding's current (gathered) weight.  The trainers call the decoder and the head one after
the other (to project only the positions they need), so the root keeps its parameters gathered
after its forward until its backward.  Gradients are reduce-scattered as sums (divide factor 1),
matching the global normaliser.  Sampling runs a different number of forward passes on each
rank (a rank stops when its rows finish), which would leave the per-layer all-gathers
unmatched, so `gathered_for_rollout` gathers every unit once before generation and reshards
after it: the rollout holds the full model on every rank, the backward passes only their shards.
Checkpoints gather a full state dict and a name-keyed optimizer state onto rank 0.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most this many elements


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: rank `rank` of `world_size` (1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" when a process group is open

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Distributed()


def launch_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables torchrun sets; (0, 1, 0) without them."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as error:
        raise SystemExit(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun): {error}") from None


def resolve_run_device(name: str, local_rank: int) -> torch.device:
    """--device for this process: "auto" and "cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


@contextlib.contextmanager
def distributed_run(device_name: str) -> Iterator[tuple[Distributed, torch.device]]:
    """Open the process group torchrun asked for (if any) and pick this process's device.

    Yields (Distributed, device).  With WORLD_SIZE unset or 1 nothing is initialised.  A group
    opened here is destroyed on exit; one that already exists (a caller's) is used and kept.
    """
    rank, world_size, local_rank = launch_environment()
    device = resolve_run_device(device_name, local_rank)
    if world_size <= 1:
        yield SINGLE, device
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
    context = Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                          backend=dist.get_backend())
    try:
        yield context, device
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Splitting work
# ---------------------------------------------------------------------------------------------


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `total` items; needs total % world_size == 0.

    Contiguous (not strided) so that consecutive items (a GRPO rollout chunk) stay on one rank.
    """
    if total % world_size:
        raise ValueError(f"{total} items cannot be split evenly over {world_size} processes")
    share = total // world_size
    return rank * share, (rank + 1) * share


# ---------------------------------------------------------------------------------------------
# Collectives (identity functions in a single-process run)
# ---------------------------------------------------------------------------------------------


def _device_of(context: Distributed, tensor: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU tensors.
    if context.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(context: Distributed, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: `values` reduced over ranks with op "sum" or "max" (a copy when single)."""
    result = values.detach().clone()
    if not context.enabled:
        return result
    work = result.to(_device_of(context, result))
    dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return work.to(values.device)


def all_reduce_numbers(context: Distributed, values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """A dict of python numbers reduced over ranks (float64 on the wire); same keys on every rank."""
    if not context.enabled or not values:
        return dict(values)
    keys = sorted(values)
    reduced = all_reduce(context, torch.tensor([float(values[key]) for key in keys], dtype=torch.float64), op)
    return {key: float(value) for key, value in zip(keys, reduced.tolist())}


def any_rank(context: Distributed, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (for decisions all ranks must share)."""
    if not context.enabled:
        return bool(flag)
    return bool(all_reduce(context, torch.tensor([1.0 if flag else 0.0]), "max").item())


def all_gather_rows(context: Distributed, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order (same shape on every rank)."""
    if not context.enabled:
        return tensor.clone()
    work = tensor.detach().contiguous().to(_device_of(context, tensor))
    pieces = [torch.empty_like(work) for _ in range(context.world_size)]
    dist.all_gather(pieces, work)
    return torch.cat(pieces, dim=0).to(tensor.device)


def as_float(value: Any) -> float:
    """A python float of a number, a tensor or a DTensor (FSDP's clip_grad_norm_ returns one)."""
    full_tensor = getattr(value, "full_tensor", None)
    if callable(full_tensor):
        value = full_tensor()
    return float(value)


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_parameters(context: Distributed, tensors: Any) -> None:
    """Copy rank 0's values into every rank's `tensors` (parameters, buffers; in place), so that
    all replicas start identical whatever each process's initialisation did."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in tensors:
            work = tensor.data.to(_device_of(context, tensor))
            dist.broadcast(work, src=0)
            if work.data_ptr() != tensor.data.data_ptr():
                tensor.data.copy_(work)


def _is_sharded(parameter: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def sum_gradients(context: Distributed, parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the .grad of every replicated parameter, in flat buckets, in place.

    Called once per optimizer step, after every micro-batch's backward.  A parameter without a
    gradient on this rank contributes zeros (the collective needs the same tensors everywhere).
    FSDP-sharded parameters (DTensors) are skipped: their gradients were reduce-scattered already.
    Updating `.grad` in place is the point of the function: the optimizer reads it next.
    """
    if not context.enabled:
        return
    replicated = [p for p in parameters if not _is_sharded(p)]
    for parameter in replicated:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for parameter in replicated:
        bucket.append(parameter)
        size += parameter.numel()
        if size >= BUCKET_ELEMENTS:
            _reduce_bucket(context, bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(context, bucket)


def _reduce_bucket(context: Distributed, bucket: list[torch.nn.Parameter]) -> None:
    grads = [p.grad for p in bucket]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_device_of(context, grads[0]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


# ---------------------------------------------------------------------------------------------
# FSDP2 (full fine-tuning)
# ---------------------------------------------------------------------------------------------


class TiedHead(torch.nn.Module):
    """The output head of a model whose head shares the input embedding's weight, reading that
    weight at call time: under FSDP the embedding's parameter is replaced by its gathered or
    sharded form as the unit runs, and a head holding the original tensor would go stale."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: not registered as a submodule (no second owner)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.embedding[0].weight)


def shard_model(context: Distributed, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply FSDP2 `fully_shard` in place (see the module docstring); returns the same model.

    Units: each decoder layer, then the decoder (embedding, final norm) as the root, then an
    untied output head on its own; a tied head becomes a `TiedHead`.  The trainers call the
    decoder and the head one after the other (not the model's own forward), and the root's
    parameters stay gathered from its forward until its backward, so a tied head sees them.
    The replicas are made identical first.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from grpo.hf_compat import causal_lm_of

    causal_lm = causal_lm_of(model)
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if layers is None or head is None:
        raise SystemExit(f"--fsdp: {type(causal_lm).__name__} has no decoder.layers / output head to shard")
    broadcast_parameters(context, [*model.parameters(), *model.buffers()])
    embedding = causal_lm.get_input_embeddings()
    tied = head.weight is embedding.weight
    mesh = init_device_mesh(device.type, (context.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder (root) and the head keep their parameters gathered after their forward: the
    # backward needs them next anyway, and a tied head reads the embedding after the decoder ran.
    fully_shard(decoder, mesh=mesh, reshard_after_forward=False)
    if tied:
        causal_lm.set_output_embeddings(TiedHead(embedding))
    else:
        fully_shard(head, mesh=mesh, reshard_after_forward=False)
    for module in fsdp_modules(model):
        # Sum, not mean: each rank's loss is already divided by the global normaliser.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def fsdp_modules(model: torch.nn.Module | None) -> list[Any]:
    """The FSDP units of `model` (none for None: a scripted sampler in tests runs without a model)."""
    from torch.distributed.fsdp import FSDPModule

    if model is None:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered_for_rollout(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every FSDP unit of `model` is gathered and stays gathered across forward passes, so
    ranks may run different numbers of them (sampling).  No-op for a model without FSDP units."""
    modules = fsdp_modules(model)
    nested = {id(inner) for module in modules for inner in fsdp_modules(module) if inner is not module}
    layers = [module for module in modules if id(module) in nested]  # the ones that reshard after forward
    for module in layers:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
        for module in layers:
            module.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on rank 0's CPU (other ranks get {}); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, whole, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a whole optimizer state (as `full_optimizer_state` wrote it) into this rank's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
