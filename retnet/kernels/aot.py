"""Compile the Triton kernels for a CUDA GPU on a machine without one.

Every launch the launchers make for a given dtype and head dim is recorded (the launchers run on CPU
tensors with the kernels swapped for recorders), then each recorded launch is compiled with every
config of its GPU autotune sweep by Triton's real compiler and ptxas for the target architecture.
The report gives, per compile: registers per thread, spilled bytes (stack/local), the shared memory
the launch needs against what one block may use on that GPU, and the instructions its dots became
(wgmma on Hopper, mma.sync, or plain FMA). A kernel that fails to lower,
fails ptxas, or fits no config of its sweep shows up here instead of on a user's GPU.

    python -m retnet.kernels.aot                       # sm_90 (H100/H200), every dtype, K = V in 64/128/256
    python -m retnet.kernels.aot --arch 80 89 --dtypes bfloat16 --head-dims 128 --json report.json

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT functions being compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

from retnet.kernels.checks import MAX_HEAD_DIM, check_chunk_size

# Largest shared memory one block can opt into, in bytes, per compute capability (CUDA programming guide). An arch
# not listed is refused: its limit read as 0 reported every launch as fitting no config (sm_100, sm_120).
MAX_SHARED_BYTES = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                    120: 101376}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64"}
# (module, attribute) of every Triton kernel the launchers start.
KERNELS = (
    ("retnet.kernels.chunk", "_chunk_state_fwd_kernel"),
    ("retnet.kernels.chunk", "_chunk_output_fwd_kernel"),
    ("retnet.kernels.chunk", "_chunk_state_bwd_kernel"),
    ("retnet.kernels.chunk", "_chunk_dv_bwd_kernel"),
    ("retnet.kernels.chunk", "_chunk_dqk_bwd_kernel"),
    ("retnet.kernels.recurrent", "_recurrent_fwd_kernel"),
)


@dataclass(frozen=True)
class Launch:
    """One kernel specialization as a launch makes it: argument types and constexpr values."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr"), in argument order
    constexprs: tuple[tuple[str, object], ...]

    def describe(self) -> str:
        shown = {k: v for k, v in self.constexprs if v is not None and k not in ("H",)}
        types = sorted({t for _, t in self.signature if t.startswith("*") and not t.startswith("*i")})
        return f"{self.kernel} {'/'.join(types)} " + " ".join(f"{k}={v}" for k, v in shown.items())


@dataclass
class CompileResult:
    launch: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # stack + local memory per thread: what ptxas had to spill
    matmul: str = ""  # the instructions tl.dot became: wgmma (Hopper warpgroup), mma (sm_80 style) or fma
    shared_bytes: int = 0
    shared_limit: int = 0
    # Offsets into a data tensor (q, k, v, o, states, gradients) computed in 32 bits: they wrap past 2^31
    # elements (B=8, T=128k, H=32, K=128 is 4.3e9), which only a tensor that large shows (see narrow_offsets).
    narrow_offsets: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.ok and self.shared_bytes <= self.shared_limit


class _Recorder:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **constexprs)`` records instead of running."""

    def __init__(self, module: str, name: str, tuner, sink: set):
        self.module, self.name, self.tuner, self.sink = module, name, tuner, sink

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **constexprs):
        arg_names = self.tuner.fn.arg_names
        signature = []
        for name, value in zip(arg_names, args):
            signature.append((name, _triton_type(name, value)))
        values = dict(constexprs)
        values.update({name: None for name, value in zip(arg_names, args) if value is None})
        signature += [(name, "constexpr") for name in constexprs]
        order = {name: i for i, name in enumerate(arg_names)}
        signature.sort(key=lambda item: order[item[0]])
        self.sink.add(Launch(self.module, self.name, tuple(signature), tuple(sorted(values.items()))))


def _triton_type(name: str, value) -> str:
    if value is None:
        return "constexpr"
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def record_launches(dtype: torch.dtype, head_dim: int, varlen: bool, num_heads: int = 8, chunk_size: int = 64) -> set[Launch]:
    """Every kernel specialization that forward + backward of the chunk op and the recurrent op launch
    for this dtype, K = V = ``head_dim`` and layout, with initial and final states in play (the variant
    with the most code)."""
    from retnet.kernels import chunk, recurrent

    launches: set[Launch] = set()
    B, T = (1, 150) if varlen else (2, 75)
    cu_seqlens = torch.tensor([0, 37, 150], dtype=torch.int32) if varlen else None
    N = 2
    q = torch.zeros(B, T, num_heads, head_dim, dtype=dtype)
    h0 = torch.zeros(N, num_heads, head_dim, head_dim)
    log_decay = torch.full((num_heads,), -0.1)
    scale = head_dim**-0.5
    with contextlib.ExitStack() as patches:
        for module_name, name in KERNELS:
            module = importlib.import_module(module_name)
            recorder = _Recorder(module_name, name, getattr(module, name), launches)
            patches.enter_context(mock.patch.object(module, name, recorder))
        chunk.chunk_retention_fwd(q, q, q, log_decay, scale, h0, True, chunk_size, cu_seqlens)
        chunk.chunk_retention_bwd(q, q, q, log_decay, scale, h0, q, h0, chunk_size, cu_seqlens)
        recurrent.recurrent_retention_fwd(q[:, :3], q[:, :3], q[:, :3], log_decay, scale, h0, True,
                                          None if cu_seqlens is None else torch.tensor([0, 1, 3], dtype=torch.int32))
    return launches


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spilled bytes per thread) from ``cuobjdump -res-usage``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


# Pointer arguments that index small host-built tables (one entry per head, sequence or chunk): 32-bit offsets
# into them are fine. Every other pointer argument is a data tensor that can exceed 2^31 elements.
INDEX_ARGUMENTS = frozenset({"log_decay", "cu_seqlens", "chunk_offsets", "chunk_indices"})


def narrow_offsets(ttir: str, pointer_args: Iterable[str]) -> list[str]:
    """The places where Triton IR offsets a data-tensor argument by a 32-bit integer.

    Program ids and ``tl.arange`` are int32 on a GPU, so ``b * T * H * K`` built from them wraps past 2^31
    elements; the kernels cast each base offset to int64 before scaling it. That shows in the IR as the first
    ``tt.addptr`` on the argument (directly, or on its ``tt.splat`` for a tile of pointers) taking an ``i64``
    offset; tile offsets added after that may stay 32-bit. Returns the offending IR lines (empty when every
    data pointer is offset in 64 bits)."""
    found = []
    lines = ttir.splitlines()
    for name in set(pointer_args) - INDEX_ARGUMENTS:
        bases = {name}
        for line in lines:
            splat = re.match(rf"\s*(%[\w.]+) = tt\.splat %{re.escape(name)}\b", line)
            if splat:
                bases.add(splat.group(1).lstrip("%"))
        for line in lines:
            match = re.search(r"tt\.addptr %([\w.]+), %[\w.]+ : (.*?)(?: loc\(|$)", line)
            if match and match.group(1) in bases and not re.search(r"(?:\bi64|xi64>)$", match.group(2).strip()):
                found.append(f"{name}: {line.strip()}")
    return sorted(found)


def _matmul_instructions(ptx: str) -> str:
    """Which tensor-core path the dots took: ``tcgen05`` is sm_100's (Blackwell data center), ``wgmma`` needs
    sm_90 and 4-warp groups, ``mma`` is the sm_80 path, ``fma`` means no tensor cores at all."""
    markers = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
    found = [name for name, marker in markers if marker in ptx]
    return "+".join(found) or "fma"


def compile_launch(launch: Launch, arch: int, num_warps: int, num_stages: int) -> CompileResult:
    """Compile one launch with one config for ``sm_<arch>``; errors are caught into the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(launch.describe(), arch, num_warps, num_stages, ok=False,
                           shared_limit=MAX_SHARED_BYTES.get(arch, 0))
    jit_fn = getattr(importlib.import_module(launch.module), launch.kernel).fn
    signature = dict(launch.signature)
    # Torch allocations are 16-byte aligned, and the JIT specializes pointers on that; so do we.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, kind) in enumerate(launch.signature) if kind.startswith("*")}
    source = ASTSource(jit_fn, signature, constexprs=dict(launch.constexprs), attrs=attrs)
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
        result.registers, result.spill_bytes = _resource_usage(compiled.asm["cubin"])
        result.matmul = _matmul_instructions(compiled.asm["ptx"])
        result.narrow_offsets = narrow_offsets(
            compiled.asm["ttir"], [name for name, kind in launch.signature if kind.startswith("*")]
        )
        result.shared_bytes = compiled.metadata.shared
        result.ok = True
    except Exception as error:  # any compiler failure is the finding being reported
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    return result


def _compile_job(job):
    return compile_launch(*job)


def check(archs: Iterable[int], dtypes: Iterable[str], head_dims: Iterable[int], varlen: Iterable[bool] = (False, True),
          configs: str = "all", workers: int | None = None, kernels: Iterable[str] | None = None,
          chunk_sizes: Iterable[int] = (64,)) -> list[CompileResult]:
    """Compile every recorded launch with its autotune configs (``configs="all"``), with its default config
    alone (``"default"``: what runs untuned, under ``RETNET_AUTOTUNE=0``), or with three of them
    (``"extremes"``): the fewest warps with the most stages, the heaviest on registers per thread and on
    shared memory, the most warps with the fewest stages, the lightest, and the default. ``varlen`` picks the
    padded (False) and/or packed (True) layouts."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # (a ValueError: main() gives it as a usage line)
        raise ValueError("TRITON_INTERPRET=1 is set: the interpreter replaces the kernels this compiles; "
                         "run it without (env -u TRITON_INTERPRET ...)")
    archs = list(archs)
    unknown = sorted(set(archs) - set(MAX_SHARED_BYTES))
    if unknown:
        raise ValueError(f"arch {', '.join(map(str, unknown))}: no shared-memory limit known to check launches "
                         f"against; known: {', '.join(map(str, sorted(MAX_SHARED_BYTES)))}")
    # The launchers are called directly here, past the ops' input rules: a head dim or chunk size the ops refuse
    # was compiled (or failed on a ZeroDivisionError) and reported as if a model could launch it.
    head_dims, chunk_sizes = list(head_dims), list(chunk_sizes)
    outside = [dim for dim in head_dims if not 1 <= dim <= MAX_HEAD_DIM]
    if outside:
        raise ValueError(f"head dims must be in [1, {MAX_HEAD_DIM}], as the retention ops take them; got "
                         f"{', '.join(map(str, outside))}")
    for chunk_size in chunk_sizes:
        check_chunk_size(chunk_size, "retnet.kernels.aot")
    if kernels is not None:
        # A name that matches no kernel (a typo) compiled nothing and exited 0: a check that passed checking nothing.
        kernels = list(kernels)
        names = [name for _, name in KERNELS]
        unmatched = [wanted for wanted in kernels if not any(wanted in name for name in names)]
        if unmatched:
            raise ValueError(f"--kernels {', '.join(unmatched)}: matches no kernel; the kernels: {', '.join(names)}")
    launches: set[Launch] = set()
    for dtype in dtypes:
        for head_dim in head_dims:
            for packed in varlen:
                for chunk_size in chunk_sizes:
                    launches |= record_launches(DTYPES[dtype], head_dim, packed, chunk_size=chunk_size)
    if kernels is not None:
        launches = {launch for launch in launches if any(name in launch.kernel for name in kernels)}
    jobs = []
    for launch in sorted(launches, key=lambda item: (item.kernel, item.describe())):
        kernel = getattr(importlib.import_module(launch.module), launch.kernel)
        pairs = sorted({(c.num_warps, c.num_stages) for c in kernel.gpu_configs})
        default = (kernel.default_config.num_warps, kernel.default_config.num_stages)
        if configs == "extremes":
            warps, stages = [w for w, _ in pairs], [s for _, s in pairs]
            pairs = sorted({(min(warps), max(stages)), (max(warps), min(stages)), default})
        elif configs == "default":
            pairs = [default]
        jobs += [(launch, arch, w, s) for arch in archs for w, s in pairs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [compile_launch(*job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_job, jobs))


def format_report(results: list[CompileResult]) -> str:
    lines = [f"{'arch':>4} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'dots':>9}  launch"]
    for r in results:
        if r.ok:
            smem = f"{r.shared_bytes / 1024:.0f}" + ("" if r.fits else f">{r.shared_limit // 1024}!")
            lines.append(f"{r.arch:>4} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>4} {r.spill_bytes:>5} "
                         f"{smem:>8} {r.matmul:>9}  {r.launch}")
        else:
            lines.append(f"{r.arch:>4} {r.num_warps:>5} {r.num_stages:>6}  FAILED  {r.launch}: {r.error}")
    return "\n".join(lines)


def unusable_launches(results: list[CompileResult]) -> list[str]:
    """Launches (per arch) for which no config compiles and fits in shared memory: these would fail on a GPU."""
    usable: dict[tuple[str, int], bool] = {}
    for r in results:
        usable[(r.launch, r.arch)] = usable.get((r.launch, r.arch), False) or r.fits
    return [f"sm_{arch}: {launch}" for (launch, arch), ok in usable.items() if not ok]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(MAX_SHARED_BYTES),
                        metavar="ARCH", help=f"compute capabilities among {sorted(MAX_SHARED_BYTES)}, e.g. 80 89 90")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--configs", choices=["all", "extremes", "default"], default="all")
    parser.add_argument("--layouts", nargs="+", choices=["padded", "packed"], default=["padded", "packed"])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64],
                        help="chunk_size values to launch with (the kernels tile with powers of two in 16..64)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--kernels", nargs="+", default=None, help="only kernels whose name contains one of these")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    varlen = [layout == "packed" for layout in args.layouts]
    try:
        results = check(args.arch, args.dtypes, args.head_dims, varlen, configs=args.configs, workers=args.workers,
                        kernels=args.kernels, chunk_sizes=args.chunk_sizes)
    except ValueError as error:  # (a bad --head-dims or --chunk-sizes, TRITON_INTERPRET=1: the usage line, exit 2)
        parser.error(str(error))
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) | {"fits": r.fits} for r in results], handle, indent=1)
    failed = [r for r in results if not r.ok]
    unusable = unusable_launches(results)
    spilling = [r for r in results if r.ok and r.spill_bytes]
    print(f"\n{len(results)} compiles: {len(failed)} failed, {len(spilling)} spill registers, "
          f"{sum(not r.fits for r in results if r.ok)} exceed shared memory; "
          f"{len(unusable)} launches with no usable config")
    for line in unusable:
        print("  no usable config:", line)
    return 1 if failed or unusable else 0


if __name__ == "__main__":
    sys.exit(main())
