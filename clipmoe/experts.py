"""The experts of an MoE layer: E two-layer MLPs run over tokens already sorted by expert.

Both weight matrices are stacked as (E, D, F): `w1[e]` is nn.Linear(D, F).weight transposed and `w2[e]` is
nn.Linear(F, D).weight, so y = act(x w1[e] + b1[e]) w2[e]^T + b2[e].

On CUDA with bf16 the experts run as two `grouped_mm` calls. On CUDA in other dtypes they run as two
padded batched products when padding at most doubles the rows (`_padded_experts`): padded to the largest
group, or, while a CUDA graph is captured, to the routing's static capacity (then no count is read back
to the host). Everywhere else `_ExpertMLP` runs one matmul per expert on its contiguous slice and writes
its outputs and weight gradients in place (no concatenation of E pieces, no stacking of E weight
gradients); on CPU two experts run at a time, each on half of torch's threads (`Experts.lanes`, see
`_run_lanes`). The layout is chosen for oneDNN's bf16 kernels on CPU, which run a product whose first operand
is transposed 1.5-2.2x slower: with (E, D, F) weights and (c, F) activations no product has one (the weight
gradients are x^T h and gy^T a, with the small (c, D) x and gy transposed explicitly). Against the layout
before, (E, F, D) weights and (F, c) activations, which had two such products per expert (BENCHMARKS.md,
same process): the bf16 layer at 16,384 tokens and k = 1 took 188.7 against 201.9 ms (dropless) and 190.2
against 202.0 (cf 1.25), at 4,096 tokens and k = 2 91.6 against 95.5; at 4,096 tokens and k = 1 (about 512
rows per expert) the two are level within the runs' spread, and so is fp32 (MKL).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .first_order import first_order


class Experts(nn.Module):
    """E two-layer MLPs. The seam for execution strategies: `forward(x_SD, counts_E)` takes tokens sorted
    by expert and per-expert counts and returns their outputs in the same order. Expert parallelism
    (`expert_parallel.ParallelExperts`) keeps this call and holds a share of the experts behind it."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act_layer: Callable[[], nn.Module],
                 lanes: Optional[int] = None):
        super().__init__()
        self.lanes = lanes  # CPU: experts run on this many threads at once; None: 2 if torch has 2+ threads
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = act_layer()
        # the same init as the dense Mlp's Linears (see model._init_linear), so swapping is neutral
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    @property
    def dim(self) -> int:
        return self.w1.shape[1]

    @property
    def hidden(self) -> int:
        return self.w1.shape[2]

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    @classmethod
    def align(cls, x: torch.Tensor) -> int:
        """Multiple to pad each expert's token count to. oneDNN (CPU, bf16/fp16) compiles a kernel per
        matmul shape; with exact counts nearly every step brings new shapes (+35-55% layer time measured
        at 4,096 tokens), with multiples the shapes recur. Padding to 32 costs ~3% of the FLOPs at 4,096 tokens
        and k = 1 (about 512 rows per expert); multiples of 8 cost under 1% and, on an AVX-512 EPYC without
        AMX, took the layer (bf16, 48 routings cycled, same process) from 155.9 to 152.7 ms dropless and from
        151.1 to 148.1 at cf 1.25 (4: level with 8; 1: slower than 32). With AMX, whose tiles are 16 rows, it
        stays 32, as measured there: all padding and small-product costs together were 2% of the experts' time."""
        if x.device.type != "cpu" or cls.compute_dtype(x) not in (torch.bfloat16, torch.float16):
            return 1
        return 32 if _amx() else 8

    def sync_free(self, x: torch.Tensor, capacity: Optional[int] = None, rows: Optional[int] = None) -> bool:
        """Whether the experts can run on `rows` rows like x (default: x's) without reading the group sizes on
        the host: grouped_mm, or, given a `capacity` that bounds every group, padded batched products of that
        many rows per expert (`_static_padding`). Routing then lays out every assignment, the dropped ones
        after all groups (`forward(..., tail=True)`), so that no shape depends on the routing and the CPU
        never waits for the GPU (and the layer can be captured as a CUDA graph)."""
        rows = x.shape[0] if rows is None else rows
        if rows == 0:
            return False
        if _grouped_mm(x, self.compute_dtype(x)) is not None:
            return True
        return capacity is not None and _static_padding(x, self.w1.shape[0] * capacity, rows)

    def static_layout(self, x: torch.Tensor, capacity: Optional[int] = None, rows: Optional[int] = None) -> bool:
        """Whether this call runs sync-free (`sync_free`): always with grouped_mm; padded to the static capacity
        only while a CUDA graph is captured. Eagerly, reading the counts costs one sync but saves 11 of about
        110 ops per forward + backward (counted on a CPU trace, fp32, k = 1, capacity 1.25) and pads to the
        largest group, never more than to the capacity. The eager fp32 layer is launch-bound at 4,096 tokens
        (H200: 113 kernels, 3.2 ms for 1.9 ms of GPU work), so the launches should cost more than the sync;
        not yet measured on a GPU."""
        if not self.sync_free(x, capacity, rows):
            return False
        return _grouped_mm(x, self.compute_dtype(x)) is not None or _capturing(x)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor, tail: bool = False,
                capacity: Optional[int] = None) -> torch.Tensor:
        """`tail`: x may hold rows after the groups (their number is known only on the device, as
        S - sum(counts_E)); they get zero outputs and pass no gradient (sync-free paths only).
        `capacity`: a bound on every count known on the host (capacity mode, expert choice), which lets
        the experts run without reading the counts (see `sync_free`)."""
        device = x_SD.device.type
        dt = self.compute_dtype(x_SD)
        x_SD = x_SD.to(dt)
        w1, b1, w2, b2 = (p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(device, enabled=False):  # operands are already in the compute dtype
            grouped_mm = _grouped_mm(x_SD, dt) if x_SD.shape[0] else None  # no tokens: the loop returns (0, D)
            if grouped_mm is not None:
                offs_E = counts_E.cumsum(0).to(torch.int32)
                expert_S = expert_of_rows(counts_E, x_SD.shape[0])
                valid_S = expert_S < counts_E.numel() if tail else None
                if tail:  # grouped_mm leaves the input gradient of rows past offs[-1] undefined
                    x_SD = _ZeroTail.apply(x_SD, valid_S)
                h_SF = self.act(_GroupedBias.apply(grouped_mm(x_SD, w1, offs=offs_E), b1, expert_S, valid_S))
                return _GroupedBias.apply(grouped_mm(h_SF, w2.transpose(1, 2), offs=offs_E), b2, expert_S, valid_S)
            E = counts_E.numel()
            if capacity is not None and x_SD.shape[0] and _static_padding(x_SD, E * capacity, x_SD.shape[0]) \
                    and _capturing(x_SD):
                return _padded_experts(x_SD, counts_E, capacity, self.act, w1, b1, w2, b2, tail=tail)
            if tail:
                raise ValueError("rows after the expert groups need a sync-free path (Experts.sync_free)")
            splits = counts_E.tolist()
            if x_SD.is_cuda and _padding_pays(splits):
                return _padded_experts(x_SD, counts_E, max(splits), self.act, w1, b1, w2, b2)
            lanes = 1 if x_SD.device.type != "cpu" else self.lanes or min(2, torch.get_num_threads())
            return _ExpertMLP.apply(x_SD, splits, self.act, lanes, w1, b1, w2, b2)


@functools.lru_cache(maxsize=None)
def _amx() -> bool:
    """Whether this CPU has AMX tiles (torch's private probe; False where this torch lacks it)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows,) the expert of each row of rows grouped by expert, `counts_E` each; E for rows after the
    last group. A binary search of each row in the groups' ends: no count is read back to the host."""
    rows = torch.arange(num_rows, device=counts_E.device, dtype=counts_E.dtype)
    return torch.searchsorted(counts_E.cumsum(0), rows, right=True)


def _padding_pays(splits: list[int]) -> bool:
    """On a GPU without grouped_mm for the dtype, padded batched products beat one product per expert
    unless padding more than doubles the rows: each expert's six products are kernels the CPU must launch,
    and at these sizes launches, not FLOPs, set the time (H200, fp32, 4,096 tokens: the per-expert
    products took 2.2 ms of GPU time inside a 5.5 ms step)."""
    return sum(splits) > 0 and len(splits) * max(splits) <= 2 * sum(splits)


def _static_padding(x: torch.Tensor, padded_rows: int, rows: int) -> bool:
    """Whether experts without grouped_mm for x's dtype run as padded products of a static capacity: on a GPU
    (on the CPU the per-expert products win), when padding at most doubles the rows. Its point is not the
    FLOPs but that nothing is read back to the host; tests monkeypatch it to run the path on the CPU."""
    return x.is_cuda and padded_rows <= 2 * rows


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's CUDA stream is being captured into a graph (tests monkeypatch it, with `_static_padding`)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _padded_experts(x_SD, counts_E, C: int, act, w1, b1, w2, b2, tail: bool = False) -> torch.Tensor:
    """The experts as two batched products over groups padded to C rows: (E, C, D) -> (E, C, F) -> (E, C, D).
    Padding rows are zero inputs whose outputs are never read, so they add nothing to any gradient. With
    `tail`, rows after the groups go to one spare row past the E x C (never read either) and get output 0."""
    E, S = counts_E.numel(), x_SD.shape[0]
    expert_S = expert_of_rows(counts_E, S)
    starts_E = counts_E.cumsum(0) - counts_E
    if tail:  # expert_S is E past the groups
        within_S = torch.arange(S, device=x_SD.device) - starts_E.index_select(0, expert_S.clamp(max=E - 1))
        pos_S = torch.where(expert_S < E, expert_S * C + within_S, E * C)
    else:
        pos_S = expert_S * C + torch.arange(S, device=x_SD.device) - starts_E[expert_S]
    spare = int(tail)
    x_ECD = x_SD.new_zeros(E * C + spare, x_SD.shape[1]).index_copy(0, pos_S, x_SD)[:E * C].view(E, C, -1)
    h_ECF = act(torch.baddbmm(b1.unsqueeze(1), x_ECD, w1))
    y_ECD = torch.baddbmm(b2.unsqueeze(1), h_ECF, w2.transpose(1, 2))
    y_PD = y_ECD.view(E * C, -1)
    if tail:
        y_PD = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[1])])
    return y_PD.index_select(0, pos_S)


class _GroupedBias(torch.autograd.Function):
    """x_SF + b_EF[expert_S]: each row plus its expert's bias; rows where `valid_S` is False (after the groups,
    where grouped_mm leaves its output and input gradient undefined) are 0 and pass gradient 0. The bias
    gradient is one (E, S) one-hot product, accumulated in fp32 by the GEMM. Indexing's own backward
    scatter-adds the S rows into E with atomics, in bf16 for a bf16 layer: on an H200 that took 0.5 ms per
    call at 32,768 x 2,048, 36% of the whole layer's GPU time (forward and backward, E = 8, k = 2)."""

    @staticmethod
    def forward(ctx, x_SF, b_EF, expert_S, valid_S=None):
        E = b_EF.shape[0]
        ctx.save_for_backward(expert_S, valid_S)
        ctx.num_experts = E
        if valid_S is None:
            return x_SF + b_EF.index_select(0, expert_S)
        # where, not a product: the undefined rows may hold NaN
        return torch.where(valid_S.unsqueeze(1), x_SF + b_EF.index_select(0, expert_S.clamp(max=E - 1)), 0)

    @staticmethod
    @first_order
    def backward(ctx, g_SF):
        expert_S, valid_S = ctx.saved_tensors
        if valid_S is not None:
            g_SF = torch.where(valid_S.unsqueeze(1), g_SF, 0)
        g_b = None
        if ctx.needs_input_grad[1]:
            onehot_ES = expert_S == torch.arange(ctx.num_experts, device=expert_S.device).unsqueeze(1)
            g_b = onehot_ES.to(g_SF.dtype) @ g_SF
        return g_SF, g_b, None, None


class _ZeroTail(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient of rows where `valid_S` is False."""

    @staticmethod
    def forward(ctx, x_SD, valid_S):
        ctx.save_for_backward(valid_S)
        return x_SD.view_as(x_SD)

    @staticmethod
    @first_order
    def backward(ctx, g_SD):
        (valid_S,) = ctx.saved_tensors
        return torch.where(valid_S.unsqueeze(1), g_SD, 0), None


def _grouped_mm(x: torch.Tensor, dtype: torch.dtype) -> Optional[Callable]:
    """torch's grouped GEMM for x's device and the compute dtype, None where it does not run: other than bf16,
    off CUDA, and below compute capability 8.0 (`F.grouped_mm`) or 9.0 (the private `torch._grouped_mm`
    of torch versions without it)."""
    if not x.is_cuda or dtype != torch.bfloat16:
        return None
    fn, min_capability = getattr(F, "grouped_mm", None), (8, 0)
    if fn is None:
        fn, min_capability = getattr(torch, "_grouped_mm", None), (9, 0)
    return fn if fn is not None and torch.cuda.get_device_capability(x.device) >= min_capability else None


def _largest_first(splits: list[int]) -> list[int]:
    """The experts with tokens, most tokens first (the order lanes take them in: the longest jobs start
    first, so the lanes finish close together)."""
    return sorted((e for e, n in enumerate(splits) if n), key=lambda e: -splits[e])


_POOL: dict = {}  # pid -> executor: this process's helper threads (lanes 2.. of every caller), made on first use
_POOL_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    # keyed by pid: a forked child (a DataLoader worker) inherits the object but not its threads
    with _POOL_LOCK:
        pool = _POOL.get(os.getpid())
        if pool is None:
            _POOL.clear()
            pool = _POOL[os.getpid()] = ThreadPoolExecutor(max_workers=7, thread_name_prefix="clipmoe-experts")
        return pool


def _find_omp_set_num_threads():
    """OpenMP's omp_set_num_threads from the runtime torch loaded (libgomp on Linux, libomp on macOS);
    None where there is none (then lanes keep torch's thread count)."""
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None


_OMP_SET_NUM_THREADS = _find_omp_set_num_threads()


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """The calling thread's intra-op thread count is n inside (OpenMP's setting is per thread, so this
    touches no other thread, unlike torch.set_num_threads, which is process-wide); restored after."""
    before = torch.get_num_threads()
    if _OMP_SET_NUM_THREADS is None or n == before:
        yield
        return
    _OMP_SET_NUM_THREADS(n)
    try:
        yield
    finally:
        _OMP_SET_NUM_THREADS(before)


def _run_lanes(run: Callable[[int], None], splits: list[int], lanes: int) -> None:
    """run(e) once for every expert with tokens, on `lanes` threads at once, each taking the next expert
    (largest first) when it is done with one. A static split by token counts left one lane idle for up to
    90 ms of a 370 ms backward (fp32, 4,096 tokens, 2-core EPYC, where an expert's products took 30-45 ms
    from one call to the next).

    Each lane gets torch's threads divided by the number of lanes. Why: on CPU, oneDNN runs a product
    with a few hundred rows and a 2,048-long reduction on about one core, so one expert at a time leaves
    the other cores idle. Two experts at a time on one thread each, against one at a time on two threads,
    per layer forward + backward on 2 cores: bf16 4,096 tokens k=1 -12%, k=2 -6%, fp32 4,096 k=1 -4%,
    bf16 16,384 -2% (two lanes that both used two threads: -5%, -4%, -1%, -2%). Each expert writes only its
    own rows and its own gradient slices: no races (MKL's fp32 products may round differently on another
    thread count, so the bits can differ from those of one lane on all threads). Caveat: once the
    process has called torch.set_num_threads(n), MKL (fp32) ignores the per-lane count and each lane's
    products use n threads; oneDNN (bf16) keeps to it. The second lane starts late (up to 5 ms) while OpenMP
    threads spin after the op before (libgomp's default: ~3 ms); the clipmoe command shortens the spin to
    ~0.1 ms (cli.cpu_runtime_defaults)."""
    todo = _largest_first(splits)
    lanes = min(lanes, len(todo))
    if lanes <= 1:
        for e in todo:
            run(e)
        return
    inference = torch.is_inference_mode_enabled()
    per_lane = max(1, torch.get_num_threads() // lanes)  # the cores shared out, not oversubscribed
    queue, lock = iter(todo), threading.Lock()

    def lane():  # a fresh thread has default grad / inference modes: set this one's
        with torch.inference_mode(inference), torch.no_grad(), _intra_op_threads(per_lane):
            while True:
                with lock:
                    e = next(queue, None)
                if e is None:
                    return
                run(e)

    futures = [_executor().submit(lane) for _ in range(lanes - 1)]
    try:
        lane()
    finally:
        for f in futures:  # wait for every lane, even when this one failed
            f.exception()
    for f in futures:
        f.result()


def _transpose_explicitly(x: torch.Tensor) -> bool:
    """Whether the weight gradients' small first operands (x^T, gy^T: (D, c)) are transposed into memory before
    their products: oneDNN (CPU, bf16/fp16) runs a product whose first operand is a transposed view 1.5-2.2x
    slower; the copy is (c, D), an eighth of the product's other operand. MKL (fp32) takes the view as it is."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _act_backward(act: nn.Module, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh applied to g: closed form for nn.GELU, autograd through a recomputation otherwise."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_backward(g, h, approximate=act.approximate)
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        return torch.autograd.grad(act(h), h, g)[0]


class _ExpertMLP(torch.autograd.Function):
    """y_c = act(x_c w1_e + b1_e) w2_e^T + b2_e on each expert's slice c of the sorted tokens."""

    @staticmethod
    def forward(ctx, x_SD, splits: list[int], act, lanes: int, w1_EDF, b1_EF, w2_EDF, b2_ED):
        x_SD = x_SD.contiguous()
        y_SD = x_SD.new_empty(x_SD.shape)
        x_E, y_E = x_SD.split(splits), y_SD.split(splits)
        hidden = [None] * (2 * len(splits))  # per expert: pre-activation and activation, both (c, F)

        def run(e):
            h_cF = torch.addmm(b1_EF[e], x_E[e], w1_EDF[e])
            a_cF = act(h_cF)
            torch.addmm(b2_ED[e], a_cF, w2_EDF[e].t(), out=y_E[e])
            hidden[2 * e], hidden[2 * e + 1] = h_cF, a_cF

        _run_lanes(run, splits, lanes)
        ctx.splits, ctx.act, ctx.lanes = splits, act, lanes
        ctx.save_for_backward(x_SD, w1_EDF, w2_EDF, *hidden)  # freed by autograd unless retain_graph
        return y_SD

    @staticmethod
    @first_order
    def backward(ctx, gy_SD):
        x_SD, w1_EDF, w2_EDF, *hidden = ctx.saved_tensors
        gy_SD = gy_SD.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        gx_SD = torch.empty_like(x_SD) if need_x else None
        gw1 = gb1 = gw2 = gb2 = None
        if need_w:
            E, D, F_ = w1_EDF.shape
            gw1, gw2 = torch.empty_like(w1_EDF), torch.empty_like(w2_EDF)
            gb1, gb2 = w1_EDF.new_empty(E, F_), w1_EDF.new_empty(E, D)
        x_E, gy_E = x_SD.split(ctx.splits), gy_SD.split(ctx.splits)
        gx_E = gx_SD.split(ctx.splits) if need_x else None
        explicit = _transpose_explicitly(x_SD)

        def run(e):
            x_cD, gy_cD, h_cF, a_cF = x_E[e], gy_E[e], hidden[2 * e], hidden[2 * e + 1]
            gh_cF = _act_backward(ctx.act, torch.mm(gy_cD, w2_EDF[e]), h_cF)
            if need_w:
                gy_Dc, x_Dc = (t.t().contiguous() if explicit else t.t() for t in (gy_cD, x_cD))
                torch.mm(gy_Dc, a_cF, out=gw2[e])
                torch.sum(gy_cD, 0, out=gb2[e])
                torch.sum(gh_cF, 0, out=gb1[e])
                torch.mm(x_Dc, gh_cF, out=gw1[e])
            if need_x:
                torch.mm(gh_cF, w1_EDF[e].t(), out=gx_E[e])

        if need_w:  # an expert with no tokens: zero gradient, as autograd would give
            for e in (e for e, n in enumerate(ctx.splits) if n == 0):
                for g in (gw1, gw2, gb1, gb2):
                    g[e].zero_()
        with torch.autocast(x_SD.device.type, enabled=False):
            _run_lanes(run, ctx.splits, ctx.lanes)
        return gx_SD, None, None, None, gw1, gb1, gw2, gb2
