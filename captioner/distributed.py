"""Multi-process training helpers: DistributedDataParallel under torchrun, mixed precision, device copies.

`captioner train` runs unchanged in one process. Started by torchrun (WORLD_SIZE > 1) it joins the
process group (gloo on CPU, nccl on CUDA; each process takes cuda:LOCAL_RANK) and the training loop
uses the helpers below:

* every rank draws the same global permutation of the epoch and takes every world-th caption of each
  global batch (`shard`), so the global batch is exactly the one-process batch;
* the loss is the summed cross-entropy of the rank's tokens divided by the global batch's token count,
  times the world size (`ddp_loss`): after DDP averages the gradients they equal the one-process
  gradient of the mean loss, even when the shards hold different numbers of tokens or a shard is empty;
* rank 0 alone logs, writes checkpoints and metrics, and decodes the dev split; its scores are
  broadcast so every rank takes the same early-stopping decision;
* the local rank 0 of each machine builds the feature cache while the others wait, then they read it.

With one process every helper is a pass-through, so single-process training is unchanged.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .errors import CaptionerError


CLOSE_WAIT = datetime.timedelta(minutes=5)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class DistContext:
    """Who this process is; every method is a no-op when `world == 1`."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world, self.local_rank, self.owns_group = rank, world, local_rank, owns_group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ---
    def shard(self, idx: list[int]) -> list[int]:
        """This rank's part of a global batch: every world-th item, starting at its rank."""
        return idx[self.rank::self.world] if self.enabled else idx

    # --- model ---
    def wrap(self, module: torch.nn.Module, device: str) -> torch.nn.Module:
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
        return DDP(module, device_ids=ids)

    # --- communication ---
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float], device: str = "cpu") -> list[float]:
        """Element-wise sum over ranks (one all-reduce)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the body on each machine's local rank 0 first (e.g. to fill a shared cache), then on the rest."""
        first = self.local_rank == 0
        if self.enabled and not first:
            torch.distributed.barrier()
        yield
        if self.enabled and first:
            torch.distributed.barrier()

    def close(self, sync: bool = False) -> None:
        """Leave the process group this context joined.

        `sync` (a normal finish): first wait for every rank, at most `CLOSE_WAIT`, so no rank tears its
        connections down while another still works; then collect the DDP wrappers the caller dropped, so
        the group's threads stop here and not in interpreter teardown (where a rank once aborted with
        "terminate called without an active exception").
        """
        if self.owns_group and torch.distributed.is_initialized():
            if sync:  # owning a group means world > 1
                with contextlib.suppress(RuntimeError):  # a rank that never comes: leave anyway
                    if torch.distributed.get_backend() == "gloo":
                        torch.distributed.monitored_barrier(timeout=CLOSE_WAIT)
                    else:
                        torch.distributed.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()
            self.owns_group = False


def setup(device: str = "cpu") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (or use one already joined); else one process.

    CAPTIONER_DIST_TIMEOUT_MIN (default 120) bounds how long ranks wait for each other, e.g. while
    local rank 0 extracts features.
    """
    world = _env_int("WORLD_SIZE", 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world == 1:
            return DistContext()
        rank = torch.distributed.get_rank()
        ctx = DistContext(rank, world, _env_int("LOCAL_RANK", rank), owns_group=False)
    elif world <= 1:
        return DistContext()
    else:
        if not torch.distributed.is_available():
            raise CaptionerError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        ctx = DistContext(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), owns_group=True)
    if device.startswith("cuda"):
        if device != "cuda":
            raise CaptionerError(f"with torchrun use --device cuda (not {device}): each process takes "
                                 f"cuda:LOCAL_RANK")
        if not torch.cuda.is_available() or ctx.local_rank >= torch.cuda.device_count():
            raise CaptionerError(f"local rank {ctx.local_rank} has no CUDA device")
        torch.cuda.set_device(ctx.local_rank)  # so plain "cuda" means this process's GPU
    if ctx.owns_group:
        timeout = datetime.timedelta(minutes=_env_int("CAPTIONER_DIST_TIMEOUT_MIN", 120))
        kw = {}
        if device.startswith("cuda") and "device_id" in inspect.signature(torch.distributed.init_process_group).parameters:
            kw["device_id"] = torch.device("cuda", ctx.local_rank)  # torch >= 2.3: binds NCCL to this GPU
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout, **kw)
    return ctx


def ddp_loss(model: torch.nn.Module, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
             global_tokens: int, world: int, weight: float = 1.0, sample_prob: float = 0.0) -> torch.Tensor:
    """This rank's share of the global batch's mean token loss, scaled so DDP's gradient average is exact.

    `model` is the DDP-wrapped decoder (its forward gives logits and targets); `weight` 0 marks a
    placeholder shard on a rank that got no captions of this (last, short) batch.
    """
    logits, targets = model(features, captions, lengths, sample_prob)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss * (weight * world / global_tokens)


def bfloat16_is_native(device: str | torch.device = "cpu") -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere it is emulated
    and slower than float32, so decoding ("auto") and `autocast` keep float32 there."""
    if torch.device(device).type != "cpu":
        return False
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(c is not None and c() for c in checks)


def autocast(device: str, enabled: bool) -> tuple[contextlib.AbstractContextManager, Any]:
    """Mixed precision for the forward pass and loss: bf16 where the device supports it, else fp16 with
    a gradient scaler (CUDA only). Disabled, or on a CPU that only emulates bfloat16 (far slower than float32
    there: `python eval/bench.py train-step`): a null context and no scaler."""
    if not enabled:
        return contextlib.nullcontext(), None
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise CaptionerError(f"--amp works on cpu and cuda devices, not {device}")
    if kind == "cpu" and not bfloat16_is_native():
        return contextlib.nullcontext(), None
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
        return torch.autocast("cuda", dtype=torch.float16), scaler
    return torch.autocast(kind, dtype=torch.bfloat16), None


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """Host-to-GPU copies from pinned memory, asynchronously; a no-op on CPU and for tensors already there."""
    if device.startswith("cuda") and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def features_on_device(feats: torch.Tensor, device: str, log=print) -> torch.Tensor:
    """The whole feature table on the GPU when it takes under half the free memory; elsewhere unchanged.

    Copying each batch from the host leaves a GPU idle most of a COCO step (eval/RESULTS.md, "COCO on a GPU").
    """
    if not device.startswith("cuda"):
        return feats
    size = feats.numel() * feats.element_size()
    if not fits_on_device(size, device):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        log(f"features ({size / 2**30:.1f} GiB) stay in host memory: {free / 2**30:.1f} GiB free on {device}")
        return feats
    return feats.to(device)


def fits_on_device(nbytes: int, device: str) -> bool:
    """`features_on_device`'s rule: a table goes to the GPU when it takes under half the free memory."""
    return nbytes <= torch.cuda.mem_get_info(torch.device(device))[0] // 2
