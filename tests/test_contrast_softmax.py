"""kernels/contrast_softmax.py against an independent float64 reference.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 unless the environment already says otherwise). With TRITON_INTERPRET=0 on
a CUDA machine (benchmarks/gpu_check.sh) the same kernel tests run compiled, on "cuda".

Tolerances. Inputs are widened exactly to fp32 (every fp16/bf16 value is an fp32 value) and
the reference gets those same values in float64, so the only error is the kernel's fp32
arithmetic and the tolerance does not depend on the input dtype (TOL below says so per
dtype). With eps = 2^-23 and S = max |full| + β·|full − drop| over the finite entries:
rounding z = full + β(full − drop) and z − max(z) moves each exponent by ≲ 2·eps·S (the GPU's
exp2 scales its argument once more), so probabilities carry a relative error ≲ 4·eps·S plus a
few dozen eps from exp, the V-term sum and the division. Below 2^-126 the GPU flushes to zero,
hence a tiny absolute floor.
"""
import importlib
import math
from unittest import mock

import pytest
import torch

from kernels import contrast_softmax

cs = importlib.import_module("kernels.contrast_softmax")  # the module (the package exports the function)

# The interpreter evaluates both branches of tl.where with numpy, so the guarded −inf − (−inf)
# lanes warn although their NaNs are never selected; 0/0 of a row without a distribution warns
# on its way to the NaN that the test expects.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

EPS = 2.0**-23
# (relative floor, absolute floor) per input dtype; equal on purpose, see the module doc.
TOL = {dt: (64 * EPS, 2.0**-126) for dt in (torch.float32, torch.float16, torch.bfloat16)}

# The kernel's devices: the interpreter on CPU, or the compiled kernel on CUDA.
DEVICES = ["cpu"] if cs.INTERPRETED else (["cuda"] if torch.cuda.is_available() else [])


def test_kernel_has_a_device():
    """With no device every kernel test below is skipped; that must not pass unnoticed."""
    assert DEVICES, "no device for the kernel: run with TRITON_INTERPRET=1 (CPU) or on CUDA"


def reference64(full, drop, beta, *, index=None):
    """P_diff in float64, written apart from the module: softmax of (1+β)·full − β·drop with
    −inf in full ruled out, β = 0 ignoring drop, +inf entries sharing the row."""
    f, d = full.double(), drop.double()
    z = f if beta == 0 else (1 + beta) * f - beta * d
    out = torch.zeros_like(z)
    for r, (fr, zr) in enumerate(zip(f.reshape(-1, f.shape[-1]), z.reshape(-1, z.shape[-1]))):
        zr = zr.clone()
        zr[fr == -math.inf] = -math.inf
        if (zr == math.inf).any():
            pr = (zr == math.inf).double() / (zr == math.inf).sum()
        else:  # NaN when every entry is −inf, as intended
            pr = torch.softmax(zr, dim=0)
        out.view(-1, z.shape[-1])[r] = pr
    return out if index is None else out.gather(-1, index.long())


def scale_of(full, drop, beta) -> float:
    """S of the module doc: the size of the numbers the kernel rounds."""
    f, d = full.double(), drop.double()
    size = (f.abs() + beta * (f - d).abs()).nan_to_num(0.0, 0.0, 0.0)  # finite entries only
    return float(size.max()) if size.numel() else 0.0


def assert_matches(out, ref, *, dtype, scale):
    """out (fp32) equals ref (float64) within the stated tolerance, NaN and ±inf exactly."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    out, ref = out.cpu().double(), ref.cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs (unwritten output?)"
    inf = torch.isinf(ref) | torch.isinf(out)
    assert torch.equal(out[inf], ref[inf]), "infinities differ"
    rel, atol = TOL[dtype]
    rtol = rel + 4 * EPS * scale
    # NaN and ±inf positions were compared above; count them as error 0 here.
    err = torch.where(torch.isfinite(ref) & ~inf, (out - ref).abs(), 0.0)
    excess = err - (atol + rtol * ref.abs().nan_to_num(0.0, 0.0, 0.0))
    assert bool((excess <= 0).all()), f"max error {float(excess.max()):.3g} over the bound"


def logits(shape, dtype, device, *, seed, scale=3.0):
    """Two correlated logit tensors, like the two branches of one model."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape, generator=g) * scale
    drop = 0.8 * full + 0.6 * scale * torch.randn(shape, generator=g)
    return full.to(dtype).to(device), drop.to(dtype).to(device)


def run_kernel(full, drop, beta, **kw):
    """The kernel writing into a NaN-poisoned output, so an unwritten element shows: the launcher's
    torch.empty hands out NaN-filled floating-point tensors during the call."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    with mock.patch.object(cs.torch, "empty", poisoned):
        return cs.contrast_softmax_triton(full, drop, beta, **kw)


# -----------------------------------------------------------------------------------------
# Kernel against float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1023), (2, 3, 32000), (4, 32064), (1, 151936)])
def test_shapes_and_dtypes(shape, dtype, device):
    # (1, 151936), and V = 32000 / 32064 in fp32, are longer than one block: the looped path.
    full, drop = logits(shape, dtype, device, seed=shape[-1])
    out = run_kernel(full, drop, 0.9)
    assert_matches(out, reference64(full, drop, 0.9), dtype=dtype, scale=scale_of(full, drop, 0.9))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [None, 256])  # one block / a loop over 4 blocks
@pytest.mark.parametrize("beta", [0.0, 0.9, 2.0])
def test_beta(beta, block_size, device):
    full, drop = logits((3, 1023), torch.float16, device, seed=1)
    out = run_kernel(full, drop, beta, block_size=block_size)
    assert_matches(out, reference64(full, drop, beta), dtype=torch.float16, scale=scale_of(full, drop, beta))


@pytest.mark.parametrize("device", DEVICES)
def test_beta_zero_ignores_drop(device):
    """β = 0 is softmax(full) even where drop is ±inf or NaN (0·inf must not leak in)."""
    full, drop = logits((2, 300), torch.float32, device, seed=2)
    drop[0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    for block_size in (None, 128):
        out = run_kernel(full, drop, 0, block_size=block_size)
        assert_matches(out, torch.softmax(full.double(), -1), dtype=torch.float32, scale=float(full.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 512])
def test_large_magnitudes_and_infinities(dtype, block_size, device):
    """±1e4 logits (exp would overflow without the max shift) and −inf in either branch."""
    V = 2000
    g = torch.Generator().manual_seed(3)
    full = (torch.rand(5, V, generator=g) * 2 - 1) * 1e4
    drop = full + (torch.rand(5, V, generator=g) * 2 - 1) * 1e4
    full[0, ::7] = -math.inf  # masked in full only
    full[1, ::5] = drop[1, ::5] = -math.inf  # masked in both branches
    full[1, 0] = drop[1, 0] = 1e4  # a large, finite maximum next to them
    drop[2, [10, 900, 1999]] = -math.inf  # z = +inf at three ids: they share the row
    full[3, :] = -math.inf  # no distribution at all: NaN
    full[4, V - 1] = 1e4 + 1  # the maximum in the last (partial) block
    full, drop = full.to(dtype).to(device), drop.to(dtype).to(device)
    p = run_kernel(full, drop, 0.9, block_size=block_size)
    assert_matches(p, reference64(full, drop, 0.9), dtype=dtype, scale=scale_of(full, drop, 0.9))
    p = p.cpu()
    assert torch.isnan(p[3]).all() and not torch.isnan(p[[0, 1, 2, 4]]).any()
    assert torch.equal(p[2, [10, 900, 1999]], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [None, 256])
@pytest.mark.parametrize("K", [1, 1500])  # 1500 ids: many chunks of BLOCK_K
def test_gather(K, block_size, device):
    full, drop = logits((2, 3, 1023), torch.float16, device, seed=5)
    g = torch.Generator().manual_seed(6)
    index = torch.randint(0, 1023, (2, 3, K), generator=g)
    index[..., 0] = 1022  # the last id, and repeats when K > 1023
    index = index.to(device)
    out = run_kernel(full, drop, 0.9, index=index, block_size=block_size)
    ref = reference64(full, drop, 0.9, index=index)
    assert_matches(out, ref, dtype=torch.float16, scale=scale_of(full, drop, 0.9))
    # int32 ids through the public function give the same values
    out32 = contrast_softmax(full, drop, 0.9, index=index.int(), backend="triton")
    torch.testing.assert_close(out32, out)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    """Slices of larger tensors are read in place; three leading groups fall back to a copy."""
    V = 700
    big_f, big_d = logits((2, 5, 4, V + 37), torch.bfloat16, device, seed=7)
    g = torch.Generator().manual_seed(8)
    big_i = torch.randint(0, V, (2, 5, 4, 9), generator=g).to(device)
    col_f, col_d = logits((V, 6), torch.bfloat16, device, seed=9)  # transposed: column stride 6
    cases = {
        "two groups": (big_f[:, 1:4, 2, :V], big_d[:, 1:4, 2, :V], big_i[:, 1:4, 2, ::2]),
        "three groups": (big_f[:, 1:4, 1:3, :V], big_d[:, 1:4, 1:3, :V], big_i[:, 1:4, 1:3, :]),
        "column stride": (col_f.t()[1:5], col_d.t()[1:5], big_i[0, 0, :, ::3]),
        "expanded drop": (big_f[0, :, 0, :V], big_d[0, 0, 0, :V].expand(5, V), big_i[0, :, 0, :]),
    }
    for name, (full, drop, index) in cases.items():
        assert not full.is_contiguous(), name
        scale = scale_of(full, drop, 0.9)
        for block_size in (None, 256):
            out = run_kernel(full, drop, 0.9, block_size=block_size)
            assert_matches(out, reference64(full, drop, 0.9), dtype=torch.bfloat16, scale=scale)
            out = run_kernel(full, drop, 0.9, index=index, block_size=block_size)
            assert_matches(out, reference64(full, drop, 0.9, index=index), dtype=torch.bfloat16, scale=scale)


# -----------------------------------------------------------------------------------------
# Hand-derived values, both backends


def hand_case():
    """Rows worked out by hand with β = 1, so z = 2·full − drop:

    0: full (0, ln 3, −inf), drop (0, 0, −inf)   → z (0, ln 9, −inf)  → P (1/10, 9/10, 0)
    1: full (1, 2, 3),       drop (1, −inf, −inf) → z (1, +inf, +inf) → P (0, 1/2, 1/2)
    2: full (−inf, −inf, −inf)                    → no distribution   → P (NaN, NaN, NaN)
    3: full (0, ln 2, ln 8), drop (0, 0, 0)       → z (0, ln 4, ln 64) → P (1, 4, 64)/69
    """
    ln, inf, nan = math.log, math.inf, math.nan
    full = torch.tensor([[0, ln(3), -inf], [1, 2, 3], [-inf, -inf, -inf], [0, ln(2), ln(8)]])
    drop = torch.tensor([[0, 0, -inf], [1, -inf, -inf], [0, 0, 0], [0, 0, 0]])
    p = torch.tensor([[1 / 10, 9 / 10, 0], [0, 1 / 2, 1 / 2], [nan, nan, nan], [1 / 69, 4 / 69, 64 / 69]])
    return full, drop, p


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if DEVICES else []))
def test_hand_derived(backend):
    device = "cpu" if backend == "torch" else DEVICES[0]
    full, drop, p = hand_case()
    full, drop = full.to(device), drop.to(device)
    out = contrast_softmax(full, drop, 1.0, backend=backend).cpu()
    torch.testing.assert_close(out, p, equal_nan=True)
    # gather mode: P at the requested ids
    index = torch.tensor([[1, 2], [0, 2], [0, 1], [2, 1]])
    out = contrast_softmax(full, drop, 1.0, index=index.to(device), backend=backend).cpu()
    torch.testing.assert_close(out, p.gather(1, index), equal_nan=True)


# -----------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_backend_dispatch(device, monkeypatch):
    """auto picks the kernel on CUDA (unless interpreted) and the reference elsewhere;
    triton and torch force their path. Each path is replaced by a recorder to see it run."""
    calls = []
    real_kernel, real_ref = cs.contrast_softmax_triton, cs.contrast_softmax_reference
    monkeypatch.setattr(cs, "contrast_softmax_triton", lambda *a, **k: calls.append("triton") or real_kernel(*a, **k))
    monkeypatch.setattr(cs, "contrast_softmax_reference", lambda *a, **k: calls.append("torch") or real_ref(*a, **k))
    full, drop = logits((2, 50), torch.bfloat16, device, seed=9)
    expect = reference64(full, drop, 0.9)
    auto = "triton" if device == "cuda" and not cs.INTERPRETED else "torch"
    backends = ["auto", "torch"] + (["triton"] if device in DEVICES else [])
    for backend in backends:
        calls.clear()
        out = contrast_softmax(full, drop, backend=backend)
        assert calls == [auto if backend == "auto" else backend], backend
        assert_matches(out, expect, dtype=torch.bfloat16, scale=scale_of(full, drop, 0.9))


def test_resolve_backend(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(cs, "INTERPRETED", False)
    assert cs.resolve_backend("auto", cuda) == "triton"
    assert cs.resolve_backend("auto", cpu) == "torch"
    assert cs.resolve_backend("torch", cuda) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cs.resolve_backend("triton", cpu)
    monkeypatch.setattr(cs, "INTERPRETED", True)
    assert cs.resolve_backend("triton", cpu) == "triton"
    assert cs.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(ValueError, match="unset it"):
        cs.resolve_backend("triton", cuda)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_float64(dtype):
    full, drop = logits((2, 3, 32000), dtype, "cpu", seed=10)
    out = contrast_softmax(full, drop, 0.9, backend="torch")
    assert_matches(out, reference64(full, drop, 0.9), dtype=dtype, scale=scale_of(full, drop, 0.9))


# -----------------------------------------------------------------------------------------
# Errors


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        contrast_softmax(*args, **kwargs)
    return str(info.value)


def test_errors():
    f = torch.zeros(2, 5)
    msg = error_of(f, torch.zeros(2, 6, dtype=torch.float16, device="meta"), beta=-1, backend="cuda")
    # one error lists every problem
    for part in ["shape (2, 5) but drop has (2, 6)", "float32 but drop is torch.float16",
                 "on cpu but drop is on meta", "beta must be", "backend must be"]:
        assert part in msg, part
    assert "dtypes must be" in error_of(f.long(), f.long())
    assert "beta must be" in error_of(f, f, math.nan)
    assert "at least one dim" in error_of(torch.tensor(1.0), torch.tensor(1.0))
    assert "last dim (V) is empty" in error_of(f[:, :0], f[:, :0])
    assert "must be tensors" in error_of(f.numpy(), f)
    idx = torch.zeros(2, 3, dtype=torch.long)
    assert "int64 or int32" in error_of(f, f, index=idx.float())
    assert "leading dims (2,)" in error_of(f, f, index=torch.zeros(3, 3, dtype=torch.long))
    assert "leading dims (2,)" in error_of(f, f, index=torch.zeros(3, dtype=torch.long))
    assert "outside [0, 5)" in error_of(f, f, index=idx + 5)
    assert "outside [0, 5)" in error_of(f, f, index=idx - 1)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "cpu" in DEVICES else []))
def test_gradients_are_refused(backend):
    f = torch.zeros(2, 5, requires_grad=True)
    assert "inference only" in error_of(f, torch.zeros(2, 5), backend=backend)
    with torch.no_grad():  # fine without grad mode
        assert contrast_softmax(f, torch.zeros(2, 5), backend=backend).shape == (2, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_launch_checks(device):
    f = torch.zeros(2, 5, device=device)
    with pytest.raises(ValueError, match="power of two"):
        cs.contrast_softmax_triton(f, f, block_size=48)
    # a single row without leading dims
    v, w = logits((300,), torch.float32, device, seed=11)
    assert_matches(contrast_softmax(v, w, backend="triton"), reference64(v, w, 0.9),
                   dtype=torch.float32, scale=scale_of(v, w, 0.9))
    # empty inputs give empty outputs without a launch
    assert contrast_softmax(f[:0], f[:0], backend="triton").shape == (0, 5)
    assert contrast_softmax(f, f, index=torch.zeros(2, 0, dtype=torch.long, device=device),
                            backend="triton").shape == (2, 0)
