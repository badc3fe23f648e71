"""The contrast kernel compiled ahead of time for real cards, without a GPU.

Triton compiles for a named target with no device present (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32))`; the wheel ships ptxas). Every launch that
kernels/contrast_softmax.py's launcher makes for the vocabularies V below, in each input dtype
and mode (all V values; the K ids of hscr.py's gather mode, int64 or int32 ids), is recorded
with the kernel replaced by a recorder, specialised by Triton's own binder as a real launch
would be, and compiled for sm_80, sm_86, sm_89 and sm_90. Launches that specialise alike
compile once. ptxas then reports registers and spills per thread, Triton the shared memory.

Under pytest the compiling runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET=1,
and a triton imported in interpreter mode cannot compile. The table in benchmarks/RESULTS.md
("contrast_softmax: compiled for real cards") is this file's output:

    python tests/test_kernel_compile.py [--caps 80 90]
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

CAPS = (80, 86, 89, 90)
VOCABS = (32000, 32064, 151936)  # LLaVA-Med (Mistral), LLaVA-1.5 (llava-hf, padded), Qwen2
MODES = {"full": None, "gather-i64": "int64", "gather-i32": "int32"}  # hscr.py: gather, int64 ids
ROWS, K = 7, 10  # a few positions, hscr.py's default number of candidates


def launches(cs):
    """{(V, dtype, mode): (args, kwargs)} of the launcher's call, the kernel replaced by a recorder."""
    import torch

    calls = []
    recorder = mock.MagicMock()
    recorder.__getitem__.return_value = lambda *args, **kwargs: calls.append((args, kwargs))
    out = {}
    with mock.patch.object(cs, "_contrast_softmax_kernel", recorder):
        for V, dtype, mode in itertools.product(VOCABS, ("float32", "float16", "bfloat16"), MODES):
            full = torch.zeros(ROWS, V, dtype=getattr(torch, dtype))
            ids = None if MODES[mode] is None else torch.zeros(ROWS, K, dtype=getattr(torch, MODES[mode]))
            cs.contrast_softmax_triton(full, full.clone(), 0.9, index=ids)
            out[V, dtype, mode] = calls.pop()
    return out


def ptxas_figures(ptx: str, arch: str) -> dict[str, int]:
    """Registers and spill bytes per thread from `ptxas -v`, with the flags Triton passes."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    return {name: int(re.search(pattern, log).group(1)) for name, pattern in
            (("regs", r"Used (\d+) registers"), ("spill_st", r"(\d+) bytes spill stores"),
             ("spill_ld", r"(\d+) bytes spill loads"))}


def compile_all(caps) -> list[dict]:
    """One row per distinct compiled kernel: what it serves, its launch settings, ptxas's figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    cs = importlib.import_module("kernels.contrast_softmax")
    kernel = cs._contrast_softmax_kernel
    assert not cs.INTERPRETED, "run with TRITON_INTERPRET=0"
    rows: dict[str, dict] = {}
    for cap, ((V, dtype, mode), (args, kwargs)) in itertools.product(caps, launches(cs).items()):
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        kwargs = dict(kwargs, debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
        # What JITFunction.run does before compiling: bind, specialise, pack.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
        src = ASTSource(kernel, signature, constexprs, attrs)
        key = f"{cap}-{src.hash()}-{options.hash()}"
        if key not in rows:
            compiled = triton.compile(src, target=target, options=options.__dict__)  # raises on an error
            arch = sm_arch_from_capability(cap)
            rows[key] = dict(arch=arch, dtype=dtype, mode=mode, V=[], BLOCK=kwargs["BLOCK"],
                             warps=kwargs["num_warps"], smem=compiled.metadata.shared,
                             **ptxas_figures(compiled.asm["ptx"], arch))
        rows[key]["V"].append(V)
    return list(rows.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", type=int, nargs="+", default=list(CAPS), help="capabilities (80 = sm_80)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    rows = compile_all(args.caps)
    print(f"{'arch':7} {'dtype':9} {'mode':11} {'V':20} {'BLOCK':>6} {'warps':>5} {'regs':>5} "
          f"{'spill st/ld B':>13} {'smem B':>7}")
    for r in rows:
        spill = f"{r['spill_st']}/{r['spill_ld']}"
        print(f"{r['arch']:7} {r['dtype']:9} {r['mode']:11} {','.join(map(str, r['V'])):20} {r['BLOCK']:>6} "
              f"{r['warps']:>5} {r['regs']:>5} {spill:>13} {r['smem']:>7}")
    spilled = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    print(f"{len(rows)} kernels compiled, {len(spilled)} spill")
    return 1 if spilled else 0


@pytest.mark.slow  # ptxas for every launch: seconds per card
@pytest.mark.parametrize("caps", [(90,), (80, 86, 89)])
def test_compiles_for_real_cards_without_spills(caps, tmp_path):
    """Every launch configuration compiles for Hopper, Ampere and Ada, and none spills registers."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, __file__, "--caps", *map(str, caps)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\d+ kernels compiled, 0 spill", run.stdout), run.stdout


if __name__ == "__main__":
    sys.exit(main())
