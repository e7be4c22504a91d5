"""Every collective once, on tensors of a chosen device: to compare a group on one device
or backend with the CPU gloo group, which the NumPy tests check."""
from __future__ import annotations

import torch

N = 1001  # not divisible by any world size used: the trailing chunks are short


def rank_inputs(rank: int, world_size: int, n: int = N) -> torch.Tensor:
    """Rank ``rank``'s deterministic input of ``n`` floats."""
    g = torch.Generator().manual_seed(7919 * world_size + rank)
    return torch.randn(n, generator=g)


def battery(comm, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Run every method of ``comm`` on ``device`` tensors; the results, on the CPU, by name."""
    w, r = comm.world_size, comm.rank
    x = rank_inputs(r, w).to(device)
    c = -(-N // w)
    out: dict[str, torch.Tensor] = {}
    comm.barrier()
    out["allreduce_sum"] = comm.allreduce(x.clone(), "sum")
    out["allreduce_mean"] = comm.allreduce(x.clone(), "mean")
    out["allreduce_bf16_wire"] = comm.allreduce(x.clone(), "mean", wire_dtype=torch.bfloat16)
    shard = comm.reduce_scatter(x.clone(), "mean")
    out["reduce_scatter"] = shard
    into = torch.full((shard.numel(),), float("nan"), device=device)
    out["reduce_scatter_out"] = comm.reduce_scatter(x.clone(), "sum", out=into)
    assert out["reduce_scatter_out"].data_ptr() == into.data_ptr(), "reduce_scatter ignored out="
    out["reduce_scatter_bf16_wire"] = comm.reduce_scatter(x.clone(), "sum", wire_dtype=torch.bfloat16)
    out["allgather_numel"] = comm.allgather(shard, numel=N)
    full = torch.zeros(c * w, device=device)
    full[c * r:c * r + c].copy_(x[:c])
    out["allgather_in_place"] = comm.allgather(full[c * r:c * r + c], out=full)
    out["broadcast"] = comm.broadcast(x.clone(), src=w - 1)
    out["all_to_all"] = comm.all_to_all(x[:3 * w].contiguous())
    out["shift"] = comm.shift(x[:50].contiguous())
    into = torch.empty(50, device=device)
    out["shift_out"] = comm.shift(x[50:100].contiguous(), out=into)
    a = comm.reduce_scatter(x.clone(), "mean", async_op=True)
    b = comm.allreduce(x[:40].clone(), "sum", async_op=True)
    s = comm.shift(x[:40].clone(), async_op=True)
    out["async_shift"], out["async_allreduce"], out["async_reduce_scatter"] = s.wait(), b.wait(), a.wait()
    narrow = comm.reduce_scatter(x.clone(), "mean", wire_dtype=torch.bfloat16, async_op=True)
    a2a = comm.all_to_all(x[:3 * w].contiguous(), async_op=True)
    out["async_all_to_all"], out["async_reduce_scatter_bf16_wire"] = a2a.wait(), narrow.wait()
    comm.barrier()
    for name, t in out.items():
        assert t.device.type == torch.device(device).type, f"{name} came back on {t.device}, not {device}"
    return {name: t.cpu() for name, t in out.items()}
