"""Tests of g2sd_cache.kernels.masked_smooth_l1: Triton kernel vs torch reference vs F.smooth_l1_loss.

On CPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before anything imports the package; the setdefault below is only a fallback for running this file
alone).  With TRITON_INTERPRET unset and a CUDA GPU present the same tests run the compiled kernel.
Shapes are small because the interpreter executes every program in Python.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = triton.language

import g2sd_cache.kernels as kernels  # noqa: E402

from g2sd_cache.cache import codecs  # noqa: E402
from g2sd_cache.kernels import fused_smooth_l1 as K  # noqa: E402
from g2sd_cache.kernels import masked_smooth_l1, masked_smooth_l1_reference  # noqa: E402

FP8 = getattr(torch, "float8_e4m3fn", None)
INT4 = torch.uint8  # int4 codes, two per byte (g2sd_cache.cache.codecs "int4")

if K._INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="Triton kernel needs TRITON_INTERPRET=1 or a CUDA GPU")
    DEVICE = torch.device("cpu")

PRED_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TARGET_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8] + ([FP8] if FP8 else []) + [INT4]

# Shared tolerance table, (pred dtype, target dtype) -> (loss_rtol, loss_atol, grad_rtol, grad_atol).
# Both implementations see bit-identical fp32 operands (decoding codes is exact: code.float()*scale
# is the same fp32 multiply), so the loss differs only by summation order, whatever the dtypes.
# The gradient is in pred's dtype: the reference rounds once, the kernel twice (the derivative it
# stores, then the scaled gradient; the interpreter's fp32->bf16 cast truncates instead of rounding to
# nearest), so allow ~4 ulp of the storage dtype.  fp16 gradients of 1/N-sized values can be
# subnormal (in both implementations), hence an absolute floor of a few fp16 subnormal steps.
_GRAD_TOL = {
    torch.float32: (2e-5, 1e-9),
    torch.bfloat16: (2.0**-6, 1e-9),
    torch.float16: (2.0**-8, 2.0**-22),
}
TOL = {
    (p, t): (2e-5, 1e-7) + _GRAD_TOL[p]
    for p in PRED_DTYPES
    for t in TARGET_DTYPES
}


def _fp8_modes(target_dtype):
    if target_dtype is not FP8:
        return [None]
    modes = ["bits"]
    if DEVICE.type == "cpu" or torch.cuda.get_device_capability(DEVICE) >= (8, 9):
        modes.append("native")
    return modes


@pytest.fixture
def fp8_mode(request, monkeypatch):
    monkeypatch.setattr(K, "_FP8_DECODE", getattr(request, "param", None))
    return getattr(request, "param", None)


def make_inputs(B, T, D, pred_dtype, target_dtype, *, spread=3.0, seed=0, mask="random"):
    """pred = target + delta, with delta ~ N(0, spread^2): residuals well inside and well beyond
    +-beta (beta=2) on both signs.  Returns pred (leaf, requires grad), target, scale, token_mask."""
    g = torch.Generator().manual_seed(seed)
    scale = None
    if target_dtype is INT4:  # every byte pattern, fp16 group scales
        target = torch.randint(0, 256, (B, T, (D + 1) // 2), generator=g, dtype=torch.int32).to(torch.uint8)
        scale = (torch.rand(B, T, -(-D // 32), generator=g) * 0.5 + 0.05).half()
        value = codecs.decode(codecs.CODECS["int4"], target, scale, D)
    elif target_dtype == torch.int8:
        target = torch.randint(-127, 128, (B, T, D), generator=g, dtype=torch.int8)
        scale = torch.rand(B, T, generator=g) * 0.09 + 0.01
        value = target.float() * scale[..., None]
    elif target_dtype is FP8:
        target = (torch.randn(B, T, D, generator=g) * 60).clamp(-448, 448).to(FP8)
        scale = torch.rand(B, T, generator=g) * 0.04 + 0.01
        value = target.float() * scale[..., None]
    else:
        target = (torch.randn(B, T, D, generator=g) * 4).to(target_dtype)
        value = target.float()
    pred = (value + torch.randn(B, T, D, generator=g) * spread).to(pred_dtype)
    if mask == "random":
        token_mask = torch.rand(B, T, generator=g) < 0.6
    elif mask == "all":
        token_mask = torch.ones(B, T, dtype=torch.bool)
    elif mask == "none":
        token_mask = torch.zeros(B, T, dtype=torch.bool)
    else:
        token_mask = None
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(pred).requires_grad_(), to(target), to(scale), to(token_mask)


def loss_and_grad(fn, pred, target, scale, token_mask, beta=2.0, grad_scale=None, **kw):
    pred = pred.detach().requires_grad_()
    loss = fn(pred, target, scale=scale, token_mask=token_mask, beta=beta, **kw)
    (loss if grad_scale is None else loss * grad_scale).backward()
    return loss.detach(), pred.grad


def kernel(pred, target, **kw):
    return masked_smooth_l1(pred, target, backend="triton", **kw)


def assert_matches(a, b, pred_dtype, target_dtype):
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOL[(pred_dtype, target_dtype)]
    torch.testing.assert_close(a[0], b[0], rtol=loss_rtol, atol=loss_atol)
    assert a[1].dtype == b[1].dtype == pred_dtype
    torch.testing.assert_close(a[1].float(), b[1].float(), rtol=grad_rtol, atol=grad_atol)


# --------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize(
    "pred_dtype,target_dtype,fp8_mode",
    [(p, t, m) for p in PRED_DTYPES for t in TARGET_DTYPES for m in _fp8_modes(t)],
    ids=lambda v: str(v).replace("torch.", "") if v is not None else "-",
    indirect=["fp8_mode"],
)
def test_dtype_pairs(pred_dtype, target_dtype, fp8_mode):
    pred, target, scale, mask = make_inputs(2, 9, 33, pred_dtype, target_dtype)
    for token_mask in (None, mask):
        got = loss_and_grad(kernel, pred, target, scale, token_mask)
        ref = loss_and_grad(masked_smooth_l1_reference, pred, target, scale, token_mask)
        assert got[0].dtype == torch.float32 and got[0].dim() == 0
        assert_matches(got, ref, pred_dtype, target_dtype)
    if scale is None:  # float target, nothing masked: same as F.smooth_l1_loss in fp32
        p32 = pred.detach().float().requires_grad_()
        expected = F.smooth_l1_loss(p32, target.float(), beta=2.0)
        expected.backward()
        got = loss_and_grad(kernel, pred, target, None, None)
        assert_matches(got, (expected.detach(), p32.grad.to(pred_dtype)), pred_dtype, target_dtype)


@pytest.mark.parametrize(
    "shape,pred_dtype,target_dtype",
    [
        ((3, 197, 500), torch.float32, torch.float32),
        ((3, 197, 500), torch.bfloat16, torch.int8),
        ((1, 1, 1), torch.float32, torch.float32),
        ((2, 3, 5), torch.float16, torch.bfloat16),
        ((5, 7, 129), torch.bfloat16, torch.bfloat16),
        ((1, 3, 4097), torch.float32, torch.int8),  # D > 4096: the kernel loops over D chunks
        ((3, 197, 500), torch.bfloat16, INT4),
        ((2, 3, 5), torch.float16, INT4),  # odd D: the last byte holds one value and a pad nibble
        ((1, 3, 4097), torch.float32, INT4),  # D chunks, odd D, 129 groups (the last one of 1 channel)
    ],
    ids=str,
)
def test_shapes(shape, pred_dtype, target_dtype):
    pred, target, scale, mask = make_inputs(*shape, pred_dtype, target_dtype, seed=1)
    for token_mask in (None, mask):
        got = loss_and_grad(kernel, pred, target, scale, token_mask)
        ref = loss_and_grad(masked_smooth_l1_reference, pred, target, scale, token_mask)
        assert got[1].shape == shape
        assert_matches(got, ref, pred_dtype, target_dtype)


@pytest.mark.parametrize("beta", [2.0, 0.5, 0.0])
def test_residuals_both_regions_and_boundary(beta):
    # residuals far beyond -beta and +beta, just inside / on / just outside the boundary, and 0
    eps = 1e-3
    deltas = [-40.0, -7.5, -beta - eps, -beta, -beta + eps, -0.3, 0.0, 0.3, beta - eps, beta, beta + eps, 7.5, 40.0]
    D = len(deltas)
    d = torch.tensor(deltas, dtype=torch.float64).repeat(2, 3, 1)  # [2, 3, D]
    d[1] *= -1  # mirrored signs in the second batch item
    target = (torch.arange(2 * 3 * D, dtype=torch.float64).reshape(2, 3, D) % 5 - 2.0)
    pred = (target + d).float()
    d32 = pred.double() - target.float().double()  # the fp32-representable residuals
    ad = d32.abs()
    inside = ad < beta
    bd = beta if beta > 0 else 1.0
    elem = torch.where(inside, 0.5 * d32 * d32 / bd, ad - 0.5 * beta)
    egrad = torch.where(inside, d32 / bd, torch.sign(d32)) / d.numel()
    assert inside.any() == (beta > 0) and (~inside & (d32 > 0)).any() and (~inside & (d32 < 0)).any()

    args = (pred.to(DEVICE), target.float().to(DEVICE), None, None)
    for fn in (kernel, masked_smooth_l1_reference):
        loss, grad = loss_and_grad(fn, *args, beta=beta)
        torch.testing.assert_close(loss.double().cpu(), elem.mean(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad.double().cpu(), egrad, rtol=1e-6, atol=1e-12)
    p32 = pred.clone().requires_grad_()
    F.smooth_l1_loss(p32, target.float(), beta=beta).backward()
    torch.testing.assert_close(loss_and_grad(kernel, *args, beta=beta)[1].cpu(), p32.grad, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------------------------
# masks


def test_all_true_mask_equals_no_mask():
    pred, target, scale, _ = make_inputs(3, 11, 40, torch.bfloat16, torch.int8, mask=None)
    all_true = torch.ones(3, 11, dtype=torch.bool, device=DEVICE)
    a = loss_and_grad(kernel, pred, target, scale, None)
    b = loss_and_grad(kernel, pred, target, scale, all_true)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_false_mask_gives_zero_loss_and_grad(backend):
    pred, target, scale, mask = make_inputs(2, 6, 24, torch.float16, torch.int8, mask="none")
    assert not mask.any()
    loss, grad = loss_and_grad(masked_smooth_l1, pred, target, scale, mask, backend=backend)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.count_nonzero(grad) == 0 and not torch.isnan(grad).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_and_garbage_in_unselected_rows(seed):
    pred, target, scale, mask = make_inputs(4, 13, 48, torch.float32, torch.float32, seed=seed)
    assert mask.any() and not mask.all()
    ref = loss_and_grad(masked_smooth_l1_reference, pred, target, scale, mask)
    # loss over the selected tokens only, straight from F.smooth_l1_loss
    p32 = pred.detach()[mask].requires_grad_()
    expected = F.smooth_l1_loss(p32, target[mask], beta=2.0)
    # NaN / inf in unselected tokens must not leak (the kernel never reads those rows)
    pred_bad, target_bad = pred.detach().clone(), target.clone()
    pred_bad[~mask] = float("nan")
    target_bad[~mask] = float("inf")
    got = loss_and_grad(kernel, pred_bad, target_bad, scale, mask)
    assert_matches(got, ref, torch.float32, torch.float32)
    torch.testing.assert_close(got[0], expected.detach(), rtol=2e-5, atol=1e-7)
    assert torch.count_nonzero(got[1][~mask]) == 0


# --------------------------------------------------------------------------------------------
# quantised targets


@pytest.mark.parametrize("code_dtype", [torch.int8] + ([FP8] if FP8 else []) + [INT4], ids=str)
def test_codes_with_scale(code_dtype):
    pred, codes, scale, mask = make_inputs(3, 10, 36, torch.float32, code_dtype, seed=5)
    value = codes.float() * scale[..., None] if code_dtype is not INT4 else _int4_by_hand(codes, scale, 36)
    for token_mask in (None, mask):
        got = loss_and_grad(kernel, pred, codes, scale, token_mask)
        ref = loss_and_grad(masked_smooth_l1_reference, pred, value, None, token_mask)
        assert_matches(got, ref, torch.float32, torch.float32)


def _int4_by_hand(codes, scale, D):
    """The int4 layout spelled out element by element: channel c is nibble c % 2 of byte c // 2 (low first),
    value (n - 7.5) * scale[c // 32]."""
    codes, scale = codes.cpu(), scale.cpu().float()
    out = torch.empty(*codes.shape[:-1], D)
    for c in range(D):
        n = (codes[..., c // 2].int() >> (4 * (c % 2))) & 15
        out[..., c] = (n.float() - 7.5) * scale[..., c // 32]
    return out.to(DEVICE)


def test_int4_codes_of_the_codec_decode_in_the_kernel():
    """Targets encoded by the real codec (stochastic rounding, fp16 group scales), masked and not, odd D."""
    for D, pred_dtype in ((33, torch.bfloat16), (64, torch.float16), (97, torch.float32)):
        g = torch.Generator().manual_seed(D)
        x = torch.nn.functional.layer_norm(torch.randn(3, 11, D, generator=g), (D,))
        codes, scale = codecs.encode(codecs.CODECS["int4"], x, seeds=torch.arange(3))
        assert codes.shape == (3, 11, (D + 1) // 2) and scale.shape == (3, 11, -(-D // 32))
        pred = (x + torch.randn(3, 11, D, generator=g) * 2).to(pred_dtype)
        mask = torch.rand(3, 11, generator=g) < 0.5
        codes, scale, pred, mask = codes.to(DEVICE), scale.to(DEVICE), pred.to(DEVICE), mask.to(DEVICE)
        for token_mask in (None, mask):
            got = loss_and_grad(kernel, pred, codes, scale, token_mask)
            ref = loss_and_grad(masked_smooth_l1_reference, pred, codes, scale, token_mask)
            assert_matches(got, ref, pred_dtype, INT4)
            value = codecs.decode(codecs.CODECS["int4"], codes, scale, D)
            assert torch.equal(value, _int4_by_hand(codes, scale, D))
            same = loss_and_grad(kernel, pred, value, None, token_mask)
            torch.testing.assert_close(got[0], same[0], rtol=2e-6, atol=0)   # same fp32 targets exactly
            assert torch.equal(got[1], same[1])


@pytest.mark.skipif(FP8 is None, reason="torch has no float8_e4m3fn")
def test_fp8_bit_decoder_is_exact_for_all_256_codes():
    @triton.jit
    def decode(src_ptr, dst_ptr):
        offs = tl.arange(0, 256)
        b = tl.load(src_ptr + offs).to(tl.int32)
        tl.store(dst_ptr + offs, K._e4m3fn_bits_to_fp32(b))

    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    decode[(1,)](bits, out)
    expected = bits.view(FP8).float()
    assert torch.equal(out.isnan(), expected.isnan()) and int(expected.isnan().sum()) == 2
    ok = ~expected.isnan()
    assert torch.equal(out[ok], expected[ok])
    assert torch.equal(out[ok].signbit(), expected[ok].signbit())  # -0.0 too


# --------------------------------------------------------------------------------------------
# autograd details


@pytest.mark.parametrize("pred_dtype", PRED_DTYPES, ids=str)
def test_grad_output_not_one(pred_dtype):
    pred, target, scale, mask = make_inputs(2, 8, 20, pred_dtype, torch.bfloat16, seed=3)
    got = loss_and_grad(kernel, pred, target, scale, mask, grad_scale=3.5)
    ref = loss_and_grad(masked_smooth_l1_reference, pred, target, scale, mask, grad_scale=3.5)
    assert_matches(got, ref, pred_dtype, torch.bfloat16)
    zero = loss_and_grad(kernel, pred, target, scale, mask, grad_scale=0.0)
    assert torch.count_nonzero(zero[1]) == 0


def test_scale_grad_kernel():
    # the backward: dst = src * (inv_count * grad_output) in fp32, one rounding, in place or into another dtype
    g = torch.Generator().manual_seed(0)  # |l'(d)| in [0.05, 1]: products stay in fp16's normal range
    src = ((torch.rand(3, 5000, generator=g) * 0.95 + 0.05) * torch.randn(3, 5000, generator=g).sign()).to(DEVICE)
    n = src.numel()
    inv, go = 1.0 / 6.3e6, 65536.0 * 0.93 / 2
    expected = src.double() * (torch.tensor(inv, dtype=torch.float32).double() * go)
    for src_dtype, dst_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                 (torch.float32, torch.float16), (torch.float32, torch.float32)):
        stored = src.to(src_dtype)
        want = (stored.double() * (torch.tensor(inv, dtype=torch.float32).double() * go)).to(dst_dtype)
        dst = stored if src_dtype == dst_dtype else torch.empty(src.shape, dtype=dst_dtype, device=DEVICE)
        K._scale_grad_kernel[(triton.cdiv(n, K._SCALE_BLOCK),)](
            stored, dst, torch.tensor([inv], device=DEVICE), torch.tensor([go], device=DEVICE), n, BLOCK=K._SCALE_BLOCK
        )
        # one rounding to dst's dtype (the interpreter truncates fp32->bf16 instead of rounding: 1 ulp)
        ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-22}[dst_dtype]
        torch.testing.assert_close(dst.double(), want.double(), rtol=ulp, atol=0)
        if src_dtype == torch.float32:
            torch.testing.assert_close(dst.double(), expected, rtol=ulp, atol=0)


# --------------------------------------------------------------------------------------------
# gradient precision at realistic shapes: against fp64, GradScaler-sized grad_output

# The trainer's grad_output: GradScaler's initial 65536 x its per-step factor (local / global selected
# count x world size) / accumulation steps.
GRAD_SCALER_OUTPUT = 65536.0 * 0.93 / 2
# relative L2 error of the fp16/bf16 gradient vs fp64, measured below under the interpreter (default buffer,
# no mask / fp32 buffer, mask): fp16 3.5e-4 / 1.5e-4 (torch reference 3.3e-4 / 1.5e-4), held to the 1e-3 the
# issue asks; the kernel before the fix: 4.4e-2, 3.9 % zeros.  bf16 rounds at 2^-8 relative: 2.1e-3 for the two
# roundings with round-to-nearest as on a GPU (torch reference 1.9e-3); the interpreter truncates
# fp32 -> bf16, which measures 5.1e-3 / 2.1e-3 (exactly what truncating twice / once gives in torch).
GRAD_REL_TOL = {torch.float16: 1e-3, torch.bfloat16: 6e-3 if K._INTERPRET else 3e-3}


def _fp64_gradient(pred, target, token_mask, grad_output, beta=2.0):
    d = pred.double() - target.double()
    g = torch.where(d.abs() < beta, d / beta, torch.sign(d))
    if token_mask is not None:
        g = g * token_mask[..., None]
        n = int(token_mask.sum()) * pred.shape[-1]
    else:
        n = pred.numel()
    return g * (grad_output / n)


@pytest.mark.parametrize("pred_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fp32_grad_buffer", [False, True], ids=["pred-dtype-buffer", "fp32-buffer"])
def test_gradient_precision_at_realistic_shape(pred_dtype, fp32_grad_buffer):
    B, T, D = 16, 197, 512   # 1/N_sel ~ 6e-7 (and 1.5e-7 at B=64): fp16's subnormal range
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.layer_norm(torch.randn(B, T, D, generator=g), (D,))
    pred = (target + torch.randn(B, T, D, generator=g) * 2).to(pred_dtype)
    token_mask = (torch.rand(B, T, generator=g) < 0.75) if fp32_grad_buffer else None
    expected = _fp64_gradient(pred, target, token_mask, GRAD_SCALER_OUTPUT)
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    _, got = loss_and_grad(kernel, to(pred), to(target), None, to(token_mask), grad_scale=GRAD_SCALER_OUTPUT,
                           fp32_grad_buffer=fp32_grad_buffer)
    got = got.cpu().double()
    rel = float((got - expected).norm() / expected.norm())
    assert rel <= GRAD_REL_TOL[pred_dtype], rel
    # no element flushed to zero that fp16 can hold (2^-24), none with the wrong sign, magnitudes not collapsed
    assert not bool(((got == 0) & (expected.abs() >= 2.0**-24)).any())
    assert bool((torch.sign(got) == torch.sign(expected))[got != 0].all())
    assert got.abs().unique().numel() > 1000
    # the torch reference is held to the same bound (it rounds once)
    _, ref = loss_and_grad(masked_smooth_l1_reference, pred, target, None, token_mask, grad_scale=GRAD_SCALER_OUTPUT)
    assert float((ref.double() - expected).norm() / expected.norm()) <= GRAD_REL_TOL[pred_dtype]


def test_fp32_grad_buffer_rounds_once():
    """With the fp32 buffer the kernel's gradient is the fp32 gradient rounded once: what the torch reference
    returns, up to the last bit of summation order."""
    pred, target, scale, mask = make_inputs(2, 9, 40, torch.float16, torch.int8, seed=4)
    got = loss_and_grad(kernel, pred, target, scale, mask, grad_scale=3000.0, fp32_grad_buffer=True)
    ref = loss_and_grad(masked_smooth_l1_reference, pred, target, scale, mask, grad_scale=3000.0)
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=2.0**-10, atol=0)
    assert got[1].dtype == torch.float16


def test_target_gets_no_gradient_and_dtypes():
    pred, target, scale, mask = make_inputs(2, 4, 16, torch.bfloat16, torch.float32)
    target.requires_grad_()
    loss = kernel(pred, target, token_mask=mask)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert pred.grad.dtype == torch.bfloat16 and target.grad is None


def test_no_grad_and_pred_without_grad():
    pred, target, scale, mask = make_inputs(2, 5, 12, torch.float32, torch.int8)
    expected = masked_smooth_l1_reference(pred, target, scale=scale, token_mask=mask)
    with torch.no_grad():
        a = kernel(pred, target, scale=scale, token_mask=mask)
    b = kernel(pred.detach(), target, scale=scale, token_mask=mask)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, expected.detach(), rtol=2e-5, atol=1e-7)
    assert torch.equal(a, b)


def test_second_backward_through_same_graph_is_refused():
    pred, target, _, _ = make_inputs(1, 3, 8, torch.bfloat16, torch.float32)
    loss = kernel(pred, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    # the fp32 buffer is not scaled in place: a second backward gives the same gradient again
    p = pred.detach().requires_grad_()
    loss = kernel(p, target, fp32_grad_buffer=True)
    (first,) = torch.autograd.grad(loss, p, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, p)
    assert torch.equal(second.float(), (first.float() * 2))


def test_noncontiguous_inputs():
    B, T, D = 2, 7, 18
    g = torch.Generator().manual_seed(7)
    pred_base = torch.randn(B, D, T, generator=g).to(DEVICE)  # transposed view -> [B, T, D]
    code_base = torch.randint(-127, 128, (B, T, 2 * D), generator=g, dtype=torch.int8).to(DEVICE)
    scale_base = (torch.rand(T, B, generator=g) * 0.1).to(DEVICE)
    mask_base = (torch.rand(T, B, generator=g) < 0.5).to(DEVICE)
    pred = pred_base.transpose(1, 2)
    codes = code_base[..., ::2]
    scale, mask = scale_base.t(), mask_base.t()
    assert not any(x.is_contiguous() for x in (pred, codes, scale, mask))
    got = loss_and_grad(kernel, pred, codes, scale, mask)
    contig = [x.contiguous() for x in (pred, codes, scale, mask)]
    ref = loss_and_grad(kernel, *contig)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch_ref = loss_and_grad(masked_smooth_l1_reference, pred, codes, scale, mask)
    assert_matches(got, torch_ref, torch.float32, torch.int8)


def test_bitwise_repeatable():
    pred, target, scale, mask = make_inputs(3, 197, 64, torch.bfloat16, torch.int8, seed=11)
    a = loss_and_grad(kernel, pred, target, scale, mask, grad_scale=1.7)
    b = loss_and_grad(kernel, pred, target, scale, mask, grad_scale=1.7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch():
    pred, target, scale, mask = make_inputs(0, 4, 8, torch.float32, torch.int8)
    for fn in (kernel, masked_smooth_l1_reference):
        loss, grad = loss_and_grad(fn, pred, target, scale, mask)
        assert loss.item() == 0.0 and grad.shape == (0, 4, 8)


# --------------------------------------------------------------------------------------------
# dispatch and errors


def test_backend_auto_and_torch():
    pred, target, scale, mask = make_inputs(2, 5, 12, torch.bfloat16, torch.int8)
    kw = dict(scale=scale, token_mask=mask)
    ref = masked_smooth_l1_reference(pred, target, **kw)
    assert torch.equal(masked_smooth_l1(pred, target, backend="torch", **kw), ref)
    auto = masked_smooth_l1(pred, target, **kw)
    if DEVICE.type == "cpu":
        assert torch.equal(auto, ref) and "MaskedSmoothL1Triton" not in type(auto.grad_fn).__name__
    assert kernels.masked_smooth_l1 is masked_smooth_l1


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "_INTERPRET", False)
    pred, target, _, _ = make_inputs(1, 2, 4, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_smooth_l1(pred.cpu(), target.cpu(), backend="triton")


def _bad_inputs():
    p = torch.zeros(2, 3, 4)
    f = torch.zeros(2, 3, 4)
    c = torch.zeros(2, 3, 4, dtype=torch.int8)
    s = torch.ones(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    u4 = torch.zeros(2, 3, 2, dtype=torch.uint8)  # int4 codes of D = 4
    s4 = torch.ones(2, 3, 1, dtype=torch.float16)
    return [
        ("2-D pred", dict(pred=p[0], target=f[0]), "3-D"),
        ("int pred", dict(pred=c, target=f), "pred dtype"),
        ("fp64 pred", dict(pred=p.double(), target=f), "pred dtype"),
        ("shape mismatch", dict(pred=p, target=f[:, :2]), "target shape"),
        ("int32 target", dict(pred=p, target=c.int()), "target dtype"),
        ("codes without scale", dict(pred=p, target=c), "need a float32 scale"),
        ("int4 of the wrong width", dict(pred=p, target=c.view(torch.uint8), scale=s4), "ceil\\(D/2\\)"),
        ("int4 with a per-token scale", dict(pred=p, target=u4, scale=s), "scale must be float16"),
        ("int4 scale shape", dict(pred=p, target=u4, scale=s4[:, :1]), "scale shape"),
        ("fp32_grad_buffer", dict(pred=p, target=f, fp32_grad_buffer=1), "fp32_grad_buffer"),
        ("float target with scale", dict(pred=p, target=f, scale=s), "only valid with int8/float8"),
        ("scale shape", dict(pred=p, target=c, scale=s[:, :2]), "scale shape"),
        ("scale dtype", dict(pred=p, target=c, scale=s.half()), "scale must be float32"),
        ("mask dtype", dict(pred=p, target=f, token_mask=m.int()), "token_mask must be bool"),
        ("mask shape", dict(pred=p, target=f, token_mask=m[:1]), "token_mask shape"),
        ("negative beta", dict(pred=p, target=f, beta=-1.0), "beta"),
        ("nan beta", dict(pred=p, target=f, beta=float("nan")), "beta"),
        ("backend", dict(pred=p, target=f, backend="cuda"), "backend must be"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_one_line_value_error(case, backend):
    _, kw, match = case
    kw = dict(kw)
    kw.setdefault("backend", backend)
    with pytest.raises(ValueError, match=match) as info:
        masked_smooth_l1(**kw)
    assert "\n" not in str(info.value)


def test_launch_config_rule():
    assert K._launch_config(3 * 197, 500) == (8, 512, 8)
    assert K._launch_config(256 * 197, 512) == (8, 512, 8)
    assert K._launch_config(256 * 197, 768) == (4, 1024, 8)
    assert K._launch_config(10, 8192) == (1, 4096, 8)
    assert K._launch_config(6, 33) == (8, 64, 4)
    assert K._launch_config(1, 1) == (1, 1, 2)


def test_loss_benchmark_cpu_quick_runs():
    # benchmarks/loss.py is a script beside the benchmark sections: imported here by its path
    from g2sd_cache.benchmarks import loss as mod
    report = mod.run_loss_benchmark("cpu", quick=True)
    assert report["results"] and all(r["method"] == "torch_eager" for r in report["results"])
    assert {r["target_dtype"] for r in report["results"]} == {"bfloat16", "int8", "int4"}
    assert all(r["time_ms"] > 0 and r["GBps"] > 0 and "error" not in r for r in report["results"])
    assert "| B | target | method |" in mod.format_markdown(report)
    # the precision section, small: the interpreted kernel's fp16 gradient within 1e-3 of fp64
    prec = mod.run_grad_precision("cpu", shape=(2, 197, 64))
    methods = {(r["pred_dtype"], r["method"]): r for r in prec["results"]}
    assert set(methods) == {(p, m) for p in ("float16", "bfloat16")
                            for m in ("torch_reference", "triton_fused", "triton_fused_fp32buf")}
    assert methods[("float16", "triton_fused")]["rel_err"] <= 1e-3
    assert methods[("float16", "triton_fused")]["zero_frac"] < 0.01
    assert "| pred | method |" in mod.format_precision(prec)
