"""Low-rank targets (pcaR) in the loss: training decodes the codes on the device (codes x scale @ basis + centre)
and hands the values to the fused loss. Decode + loss, through the Triton kernel (interpreted on CPU) and the
torch backend, against a reference spelled out here: forward and backward, masked and unmasked."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from g2sd_cache.cache import codecs, lowrank  # noqa: E402
from g2sd_cache.kernels import fused_smooth_l1 as K  # noqa: E402
from g2sd_cache.kernels import masked_smooth_l1  # noqa: E402

DEVICE = torch.device("cpu") if K._INTERPRET else torch.device("cuda")


def _reference(pred: torch.Tensor, codes, scale, basis, token_mask, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d loss / d pred in float64, element by element: value = sum_r code_r * scale * V_r + centre, smooth
    L1 with threshold beta, mean over the selected tokens' elements."""
    p = pred.detach().double().requires_grad_()
    b = basis.double()
    value = torch.einsum("btr,rd->btd", codes.double() * scale.double()[..., None], b[1:]) + b[0]
    d = (p - value).abs()
    elem = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    sel = torch.ones(p.shape[:2], dtype=torch.bool) if token_mask is None else token_mask.cpu()
    loss = (elem * sel[..., None]).sum() / (sel.sum() * p.shape[-1]).clamp_min(1)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("pred_dtype,decoded", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_decode_then_loss_matches_the_reference(backend, pred_dtype, decoded):
    g = torch.Generator().manual_seed(3)
    B, T, D, R = 3, 13, 48, 12
    x = torch.nn.functional.layer_norm(torch.randn(B, T, D, generator=g) @ torch.randn(D, D, generator=g), (D,))
    c = codecs.get_codec(f"pca{R}")
    basis = lowrank.fit_basis(x, R)
    codes, scale = codecs.encode(c, x, basis=basis)
    pred = (x + torch.randn(B, T, D, generator=g)).to(pred_dtype)
    mask = torch.rand(B, T, generator=g) < 0.5
    for token_mask in (None, mask):
        p = pred.to(DEVICE).detach().requires_grad_()
        target = codecs.decode(c, codes.to(DEVICE), scale.to(DEVICE), basis=basis.to(DEVICE)).to(decoded)
        loss = masked_smooth_l1(p, target, token_mask=None if token_mask is None else token_mask.to(DEVICE),
                                beta=2.0, backend=backend)
        loss.backward()
        ref_loss, ref_grad = _reference(pred, codes, scale, basis, token_mask, 2.0)
        # bf16 decoded targets round each value by 2^-9 relative; bf16 preds and gradients likewise
        tol = 1e-5 if pred_dtype == decoded == torch.float32 else 2e-2
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=1e-7)
        assert p.grad.dtype == pred_dtype
        torch.testing.assert_close(p.grad.double().cpu(), ref_grad, rtol=tol, atol=tol / (B * T * D))
        if token_mask is not None:   # unselected tokens get no gradient
            assert float(p.grad[~token_mask.to(DEVICE)].abs().max()) == 0.0


def _tiered_values(codes, scale, tiers) -> torch.Tensor:
    """An independent unpacking of pcaA+B+C codes (cache/tiered.py's layout), in numpy, float64 [..., A + B + C]."""
    import numpy as np
    a, b, c = tiers
    raw, s = codes.numpy().astype(np.int64), scale.double().numpy()
    head = np.where(raw[..., :a] > 127, raw[..., :a] - 256, raw[..., :a]) * s[..., :1]
    nib = raw[..., a:a + b // 2]
    four = np.stack([nib % 16, nib // 16], axis=-1).reshape(*nib.shape[:-1], b)
    crumbs = raw[..., a + b // 2:]
    two = np.stack([(crumbs >> k) & 3 for k in (0, 2, 4, 6)], axis=-1).reshape(*crumbs.shape[:-1], c)
    return torch.from_numpy(np.concatenate([head, (four - 7.5) * s[..., 1:2], (two - 1.5) * s[..., 2:3]], axis=-1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tiered_decode_then_loss_matches_the_reference(backend):
    g = torch.Generator().manual_seed(4)
    B, T, D = 3, 13, 48
    x = torch.nn.functional.layer_norm(torch.randn(B, T, D, generator=g) @ torch.randn(D, D, generator=g), (D,))
    c = codecs.get_codec("pca4+8+16")
    basis = lowrank.fit_basis(x, c.rank)
    codes, scale = codecs.encode(c, x, codecs.dither_seeds(0, range(B), [0] * B), basis=basis)
    coef = _tiered_values(codes, scale, c.tiers)                                  # [B, T, 28] float64
    pred = x + torch.randn(B, T, D, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.5
    for token_mask in (None, mask):
        p = pred.to(DEVICE).detach().requires_grad_()
        target = codecs.decode(c, codes.to(DEVICE), scale.to(DEVICE), basis=basis.to(DEVICE))
        loss = masked_smooth_l1(p, target, token_mask=None if token_mask is None else token_mask.to(DEVICE),
                                beta=2.0, backend=backend)
        loss.backward()
        # the reference's codes x scale is the unpacked coefficients, with a unit scale
        ref_loss, ref_grad = _reference(pred, coef, torch.ones(B, T, dtype=torch.float64), basis, token_mask, 2.0)
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-5 / (B * T * D))
        if token_mask is not None:
            assert float(p.grad[~token_mask.to(DEVICE)].abs().max()) == 0.0
