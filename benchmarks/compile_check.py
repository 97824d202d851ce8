"""Compile every Triton kernel of fastpeft, in every autotune config, for an H100 (sm_90),
on a machine without a GPU, and report registers, spills and shared memory per config.

    python benchmarks/compile_check.py                       # bf16 fp16 fp32 tf32, all ops
    python benchmarks/compile_check.py --dtypes bf16 --ops lora_linear -j 2 --json out.json

How the kernels are found: each op's launchers (``fastpeft/triton/<op>.py``: ``forward``
and ``backward``) run on small CPU tensors for a few cases per op (the ``CASES`` table)
with Triton's launch replaced by a recorder. Every kernel a launcher starts is recorded
with its real arguments, and an autotuned kernel once per config of its table. Triton's own
argument binder then turns each recorded launch into what a GPU run would compile (argument
types, the integers and pointers it specialises on, constexprs, num_warps / num_stages), so
a new kernel or config is covered as soon as a launcher starts it. Each distinct one is
compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 64)`` with Triton's bundled
ptxas, whose ``-v`` log gives the registers and spills.

Dtypes: ``bf16``, ``fp16``, ``fp32`` (tl.dot in "ieee" precision: torch's default matmul
precision), ``tf32`` (fp32 tensors with ``torch.set_float32_matmul_precision("high")``,
which switches the kernels' dots to TF32), ``fp64`` (gradcheck only; not a default).

Exit status: 0 when everything compiled; 1 when a compile failed, a launcher failed, or
every config of a launch needs more shared memory than an H100 has (a config alone over
the limit is reported: the autotuner skips it on the GPU); 2 for a usage error.
Register spills are reported, not failed: some configs spill by design (the autotuner
picks the fastest).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The kernels must be compiled, not interpreted (the launchers also pick the GPU autotune
# tables only without TRITON_INTERPRET); the C++ CPU kernels are not needed here. A fresh
# Triton cache makes ptxas run for every kernel, and its log is what gives the spills.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("FASTPEFT_NO_JIT", "1")
if "FASTPEFT_COMPILE_CHECK_CACHE" not in os.environ:  # set once, by the parent process
    os.environ["FASTPEFT_COMPILE_CHECK_CACHE"] = tempfile.mkdtemp(prefix="fastpeft-compile-")
os.environ["TRITON_CACHE_DIR"] = os.environ["FASTPEFT_COMPILE_CHECK_CACHE"]
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

H100_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = {  # name: (torch dtype, torch.set_float32_matmul_precision)
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "fp64": (torch.float64, "highest"),
}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32", "tf32")


# ---------------------------------------------------------------------------------------
# The cases: each calls one op's launchers, forward then backward, on small CPU tensors
# (the recorder runs no kernel, so outputs are uninitialised and that is fine). Together
# they reach every kernel and every autotune table: the rank tiers, the int8 GEMV modes
# (T = 1, 3, 8) and its tiled path, the bottleneck's four M_PAD tiers, head dims 64 / 128.
# Sizes are multiples of 16 where real models have them, so the pointer and integer
# specialisations are those of a real run.
# ---------------------------------------------------------------------------------------


def _randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _seed():
    return torch.tensor([1234], dtype=torch.int64)


def lora_linear(dtype, T, K, N, R, p, bias, transposed):
    from fastpeft.triton import lora_linear as launchers

    x, a, b = _randn(T, K, dtype=dtype), _randn(R, K, dtype=dtype), _randn(N, R, dtype=dtype)
    w = _randn(K, N, dtype=dtype).t() if transposed else _randn(N, K, dtype=dtype)
    bias_t = _randn(N, dtype=dtype) if bias else None
    seed = _seed() if p > 0 else None
    y, xa = launchers.forward(x, w, bias_t, a, b, 2.0, p, seed)
    launchers.backward(torch.randn_like(y), x, w, a, b, xa, 2.0, p, seed, True)


def int8_lora_linear(dtype, T, K, N, R, p, bias, backward=True):
    from fastpeft.triton import int8_lora_linear as launchers

    x, a, b = _randn(T, K, dtype=dtype), _randn(R, K, dtype=dtype), _randn(N, R, dtype=dtype)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N) / 127
    bias_t = _randn(N, dtype=dtype) if bias else None
    seed = _seed() if p > 0 else None
    y, xa = launchers.forward(x, q, scale, bias_t, a, b, 2.0, p, seed)
    if backward:
        launchers.backward(torch.randn_like(y), x, q, scale, a, b, xa, 2.0, p, seed, True)


def nf4_lora_linear(dtype, T, K, N, R, p, bias, blocksize, backward=True):
    from fastpeft.triton import nf4_lora_linear as launchers

    x, a, b = _randn(T, K, dtype=dtype), _randn(R, K, dtype=dtype), _randn(N, R, dtype=dtype)
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    absmax = torch.rand(-(-N * K // blocksize))
    bias_t = _randn(N, dtype=dtype) if bias else None
    seed = _seed() if p > 0 else None
    y, xa = launchers.forward(x, q, absmax, bias_t, a, b, 2.0, p, seed, blocksize)
    if backward:
        launchers.backward(torch.randn_like(y), x, q, absmax, a, b, xa, 2.0, p, seed, blocksize,
                           True)


def multi_lora_linear(dtype, T, K, N, R, n, p, bias, transposed):
    from fastpeft.triton import multi_lora_linear as launchers

    x = _randn(T, K, dtype=dtype)
    a, b = _randn(n, R, K, dtype=dtype), _randn(n, N, R, dtype=dtype)
    w = _randn(K, N, dtype=dtype).t() if transposed else _randn(N, K, dtype=dtype)
    bias_t = _randn(N, dtype=dtype) if bias else None
    scaling = torch.rand(n) + 0.5
    ids = torch.arange(T) % (n + 1) - 1  # every adapter and the base alone
    seed = _seed() if p > 0 else None
    y, xa = launchers.forward(x, w, bias_t, a, b, scaling, ids, p, seed)
    launchers.backward(torch.randn_like(y), x, w, a, b, xa, scaling, ids, p, seed, True)


def bottleneck_adapter(dtype, T, D, M, activation, layer_norm):
    from fastpeft.triton import bottleneck_adapter as launchers

    x = _randn(T, D, dtype=dtype)
    wd, bd = _randn(M, D, dtype=dtype), _randn(M, dtype=dtype)
    wu, bu = _randn(D, M, dtype=dtype), _randn(D, dtype=dtype)
    lnw, lnb = (_randn(D, dtype=dtype), _randn(D, dtype=dtype)) if layer_norm else (None, None)
    y, mean, rstd = launchers.forward(x, wd, bd, wu, bu, None, lnw, lnb, activation, 0.5, 1e-5)
    launchers.backward(torch.randn_like(y), x, wd, bd, wu, lnw, lnb, mean, rstd, activation,
                       0.5, True)


def gated_prefix_attention(dtype, B, H, HKV, M, N, P, D, causal, padding_mask):
    from fastpeft.triton import gated_prefix_attention as launchers

    q = _randn(B, H, M, D, dtype=dtype)
    k, v = _randn(B, HKV, N, D, dtype=dtype), _randn(B, HKV, N, D, dtype=dtype)
    pk, pv = _randn(1, HKV, P, D, dtype=dtype), _randn(1, HKV, P, D, dtype=dtype)
    gate = _randn(H, dtype=dtype)
    kpm = torch.ones(B, N, dtype=torch.bool) if padding_mask else None
    out, lse, plse, seq = launchers.forward(q, k, v, pk, pv, gate, kpm, causal, D**-0.5,
                                            False)
    launchers.backward(torch.randn_like(out), q, k, v, pk, pv, gate, kpm, seq, lse, plse,
                       causal, D**-0.5, False)


CASES = {
    "lora_linear": [
        dict(T=64, K=256, N=192, R=16, p=0.1, bias=True, transposed=False),
        dict(T=64, K=256, N=192, R=64, p=0.0, bias=False, transposed=True),
    ],
    "int8_lora_linear": [
        dict(T=1, K=512, N=192, R=16, p=0.1, bias=True, backward=False),
        dict(T=3, K=512, N=192, R=16, p=0.0, bias=False, backward=False),
        dict(T=8, K=512, N=192, R=16, p=0.1, bias=False, backward=False),
        dict(T=64, K=256, N=192, R=16, p=0.1, bias=True),
        dict(T=64, K=256, N=192, R=128, p=0.0, bias=False),
    ],
    # The GEMV's modes (T = 1, 3) and its one-absmax-per-row path (blocksize 256: whole
    # blocks per row, BLOCK_K <= 256), the tiled path with both absmax paths (K = 256:
    # BLOCK_K 64 reads one per row, 128 one per byte; K = 240: blocks cross rows) and both
    # rank tiers.
    "nf4_lora_linear": [
        dict(T=1, K=512, N=192, R=16, p=0.1, bias=True, blocksize=64, backward=False),
        dict(T=3, K=512, N=192, R=16, p=0.0, bias=False, blocksize=256, backward=False),
        dict(T=64, K=256, N=192, R=16, p=0.1, bias=True, blocksize=64),
        dict(T=64, K=240, N=192, R=128, p=0.0, bias=False, blocksize=64),
    ],
    "multi_lora_linear": [  # BLOCK_A tiers 16 (n <= 16) and 256 (n > 128); rank tiers
        dict(T=64, K=256, N=192, R=16, n=4, p=0.1, bias=True, transposed=False),
        dict(T=64, K=256, N=192, R=64, n=4, p=0.0, bias=False, transposed=True),
        dict(T=64, K=256, N=192, R=128, n=200, p=0.1, bias=False, transposed=False),
    ],
    "bottleneck_adapter": [
        dict(T=64, D=256, M=64, activation="relu", layer_norm=True),
        dict(T=64, D=256, M=128, activation="gelu", layer_norm=False),
        dict(T=64, D=256, M=256, activation="gelu_tanh", layer_norm=True),
        dict(T=64, D=256, M=512, activation="silu", layer_norm=True),
    ],
    "gated_prefix_attention": [
        dict(B=1, H=4, HKV=2, M=128, N=128, P=10, D=64, causal=True, padding_mask=True),
        dict(B=1, H=2, HKV=2, M=128, N=256, P=64, D=128, causal=False, padding_mask=False),
    ],
}
CASE_FNS = {"lora_linear": lora_linear, "int8_lora_linear": int8_lora_linear,
            "nf4_lora_linear": nf4_lora_linear,
            "multi_lora_linear": multi_lora_linear,
            "bottleneck_adapter": bottleneck_adapter,
            "gated_prefix_attention": gated_prefix_attention}


def case_label(op: str, index: int) -> str:
    """``op#n``, the n-th case of op (1-based): the report's short name for it."""
    return f"{op}#{index + 1}"


def case_legend(ops: list[str]) -> list[str]:
    return [f"  {case_label(op, i)}: " + " ".join(f"{k}={v}" for k, v in params.items())
            for op in ops for i, params in enumerate(CASES[op])]


# ---------------------------------------------------------------------------------------
# Recording launches and turning them into compile jobs
# ---------------------------------------------------------------------------------------


@dataclass
class Job:
    """One compile: a kernel specialised as the recorded launch would be on the GPU."""

    module: str  # where the @triton.jit function lives
    function: str
    kernel: str  # the name the launcher uses (an autotuner's name, or the jit function's)
    config: str  # the autotune config, or "launch options" for a kernel without autotuning
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        return repr((self.module, self.function, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted((k, repr(v)) for k, v in self.options.items())))


@dataclass
class Result:
    kernel: str
    config: str
    dtype: str
    cases: list = field(default_factory=list)  # the cases that launch it ("op#n")
    ok: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str = ""


def _kernel_names() -> dict[int, str]:
    """id(autotuner or jit function) -> its name in its fastpeft.triton module."""
    import fastpeft.triton as package

    names = {}
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"fastpeft.triton.{path.stem}")
        for name, obj in vars(module).items():
            if isinstance(obj, (Autotuner, JITFunction)):
                names.setdefault(id(obj), name)
    return names


def _jit_function(obj) -> JITFunction:
    while not isinstance(obj, JITFunction):  # an Autotuner, a Heuristics wrapper, ...
        obj = obj.fn
    return obj


def _config_label(config) -> str:
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} warps={config.num_warps} stages={config.num_stages}".strip()


@contextlib.contextmanager
def recording(launches: list):
    """Launches are recorded instead of run: a plain kernel once, as (jit function, name,
    config label, args, kwargs); an autotuned one once per config of its table (none
    pruned, none benchmarked)."""
    names = _kernel_names()
    tuner_stack = []

    def record(self, *args, grid, warmup, **kwargs):
        tuner, label = tuner_stack[-1] if tuner_stack else (None, "launch options")
        name = names.get(id(tuner if tuner is not None else self))
        if name is None:  # an autotuner built at run time (bottleneck_adapter's tiers):
            # its jit function's name and the constexprs of its autotune key
            keyed = [f"{k}={kwargs[k]}" for k in getattr(tuner, "keys", []) if k in kwargs]
            name = self.fn.__name__ + (f"[{' '.join(keyed)}]" if keyed else "")
        launches.append((self, name, label, args, kwargs))

    def tune(self, *args, **kwargs):
        for config in self.configs:
            tuner_stack.append((self, _config_label(config)))
            try:
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
            finally:
                tuner_stack.pop()

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, tune
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def jobs_for(launches: list, target: GPUTarget) -> list[Job]:
    """Each launch bound as ``JITFunction.run`` binds it on a GPU of ``target``."""
    backend = make_backend(target)
    jobs = []
    for fn, name, label, args, kwargs in launches:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, dict(kwargs), bound, specialization, options)
        jobs.append(Job(fn.fn.__module__, fn.fn.__name__, name, label, signature, constexprs,
                        attrs, dict(options.__dict__)))
    return jobs


# ---------------------------------------------------------------------------------------
# Compiling (in worker processes)
# ---------------------------------------------------------------------------------------

_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


@contextlib.contextmanager
def _captured_output():
    """Everything written to this process's stdout and stderr meanwhile, Python's prints
    (the ptxas log) and C++'s (MLIR diagnostics) alike, into the yielded list's one string."""
    text = []
    with tempfile.TemporaryFile(mode="w+") as capture:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            capture.seek(0)
            text.append(capture.read())


def _failure(err: Exception, output: str) -> str:
    """The exception, and the first diagnostics Triton printed (MLIR errors, assertions)."""
    lines = [f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"]
    for line in output.splitlines():
        if ("error:" in line or "Assertion" in line) and line.strip() not in lines:
            lines.append(line.strip())
        if len(lines) == 3:
            break
    return " | ".join(lines)


def compile_job(job: Job, capability: int) -> dict:
    """Compile one job; returns ok, registers, spills, shared bytes, seconds, error."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    fn = _jit_function(getattr(importlib.import_module(job.module), job.function))
    source = ASTSource(fn, job.signature, job.constexprs, job.attrs)
    start = time.perf_counter()
    error = None
    with _captured_output() as output:
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 64),
                                      options=job.options)
        except Exception as err:  # a frontend, MLIR or ptxas error: the report names it
            error = err
    seconds = time.perf_counter() - start
    if error is not None:
        return dict(ok=False, seconds=seconds, error=_failure(error, output[0]))
    spills = _PTXAS_SPILLS.findall(output[0])
    registers = _PTXAS_REGISTERS.findall(output[0])
    return dict(ok=True, seconds=seconds, shared_bytes=int(compiled.metadata.shared),
                registers=int(registers[-1]) if registers else None,
                spill_stores=int(spills[-1][0]) if spills else None,
                spill_loads=int(spills[-1][1]) if spills else None)


def _quiet_worker():
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _spilled(r: Result) -> bool:
    return bool(r.spill_stores or r.spill_loads)


def _span(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def report(results: list[Result], launch_errors: list[str]) -> int:
    """Print one line per (dtype, kernel) and a line per problem config; the exit status."""
    groups = defaultdict(list)
    for r in results:
        groups[(r.dtype, r.kernel)].append(r)
    print(f"{'dtype':5} {'kernel':52} {'configs':>7} {'regs':>9} {'smem KiB':>11}  notes")
    for (dtype, kernel), rs in sorted(groups.items(), key=lambda kv: (
            list(DTYPES).index(kv[0][0]), kv[0][1])):
        good = [r for r in rs if r.ok]
        regs = [r.registers for r in good if r.registers is not None]
        smem = [r.shared_bytes // 1024 for r in good]
        notes = []
        if len(good) < len(rs):
            notes.append(f"{len(rs) - len(good)} FAILED")
        if any(_spilled(r) for r in good):
            notes.append(f"{sum(_spilled(r) for r in good)} spill")
        if any(r.shared_bytes > H100_SHARED_MEMORY for r in good):
            notes.append(f"{sum(r.shared_bytes > H100_SHARED_MEMORY for r in good)} over smem")
        print(f"{dtype:5} {kernel:52} {len(good):>3}/{len(rs):<3} {_span(regs):>9} "
              f"{_span(smem):>11}  {', '.join(notes)}")
        for r in rs:
            if not r.ok:
                print(f"      FAILED {r.config} [{' '.join(r.cases)}]\n        {r.error}")
            elif _spilled(r) or r.shared_bytes > H100_SHARED_MEMORY:
                what = []
                if _spilled(r):
                    what.append(f"{r.registers} regs, spills {r.spill_stores} B stored / "
                                f"{r.spill_loads} B loaded")
                if r.shared_bytes > H100_SHARED_MEMORY:
                    what.append(f"{r.shared_bytes} B shared memory > {H100_SHARED_MEMORY}")
                print(f"      {r.config} [{' '.join(r.cases)}]: {'; '.join(what)}")

    # A launch (one case, one kernel) none of whose configs fits an H100 cannot run there.
    unfit = []
    by_launch = defaultdict(list)
    for r in results:
        for case in r.cases:
            by_launch[(r.dtype, r.kernel, case)].append(r)
    for (dtype, kernel, case), rs in sorted(by_launch.items()):
        if all(r.ok and r.shared_bytes > H100_SHARED_MEMORY for r in rs):
            unfit.append(f"{dtype} {kernel} [{case}]: no config fits an H100's shared memory")

    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and _spilled(r)]
    over = [r for r in results if r.ok and r.shared_bytes > H100_SHARED_MEMORY]
    print(f"\ntriton {triton.__version__}, sm_90: {len({r.kernel for r in results})} kernels, "
          f"{len(results)} compiles ({len(results) - len(failed)} ok, {len(failed)} failed), "
          f"{len(spilled)} with register spills, {len(over)} over an H100's shared memory; "
          f"{sum(r.seconds for r in results):.0f} s of compile time")
    for line in launch_errors + unfit:
        print(f"ERROR {line}")
    return 1 if failed or launch_errors or unfit else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=DEFAULT_DTYPES,
                        help=f"default: {' '.join(DEFAULT_DTYPES)}")
    parser.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES),
                        help="default: every op")
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability to compile for (default: 90, H100)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles in parallel (default: one per CPU)")
    parser.add_argument("--json", type=Path, help="write every compile's result here")
    parser.add_argument("--list", action="store_true",
                        help="list the compiles this would run, compile nothing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

    target = GPUTarget("cuda", args.arch, 64)
    unique: dict[str, tuple[Job, Result]] = {}
    launch_errors = []
    for dtype_name in args.dtypes:
        dtype, precision = DTYPES[dtype_name]
        for op in args.ops:
            for index, params in enumerate(CASES[op]):
                label = case_label(op, index)
                launches = []
                torch.set_float32_matmul_precision(precision)
                try:
                    with recording(launches):
                        CASE_FNS[op](dtype, **params)
                    jobs = jobs_for(launches, target)
                except Exception as err:  # a launcher that fails has a bug to report
                    launch_errors.append(f"{dtype_name} {label}: {type(err).__name__}: {err}")
                    continue
                finally:
                    torch.set_float32_matmul_precision("highest")
                for job in jobs:
                    key = f"{dtype_name} {job.key()}"
                    if key not in unique:
                        unique[key] = (job, Result(job.kernel, job.config, dtype_name))
                    if label not in unique[key][1].cases:
                        unique[key][1].cases.append(label)

    print(f"fastpeft compile check: triton {triton.__version__}, torch {torch.__version__}, "
          f"target sm_{args.arch}, dtypes {' '.join(args.dtypes)}: {len(unique)} compiles, "
          f"{args.jobs} at a time; the cases:", *case_legend(args.ops), sep="\n", flush=True)
    if args.list:
        for job, result in unique.values():
            print(f"{result.dtype:5} {job.kernel:52} {job.config}")
        return 0

    start = time.perf_counter()
    pairs = list(unique.values())
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn"),
                             initializer=_quiet_worker) as pool:
        futures = {pool.submit(compile_job, job, args.arch): result for job, result in pairs}
        for done, future in enumerate(as_completed(futures), 1):
            result = futures[future]
            for k, v in future.result().items():
                setattr(result, k, v)
            if done % 50 == 0 or done == len(futures):
                print(f"  {done}/{len(futures)} compiled, {time.perf_counter() - start:.0f} s",
                      flush=True)
    results = [result for _, result in pairs]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"triton": triton.__version__, "torch": torch.__version__, "arch": args.arch,
             "results": [asdict(r) for r in results]}, indent=1))
    status = report(results, launch_errors)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    try:
        status = main()
    finally:
        shutil.rmtree(os.environ["FASTPEFT_COMPILE_CHECK_CACHE"], ignore_errors=True)
    sys.exit(status)
