"""attention="int8" / "fp8": scaled-dot-product attention keeps q, k and v quantized, nothing else.

Plain SDPA keeps q, k, v, its output and the logsumexp for backward. Here it keeps q, k and v in 8 bits with one
scale per row (absmax over head_dim, in the activation dtype; fp32 below bf16's range), and backward dequantizes
them and runs attention once more under autograd to take its gradients. The forward is exact (the output is SDPA's
own, so the loss is unchanged); the gradients of q, k and v see the quantized inputs: lossy and opt-in, its effect
on the loss measured by tools/bench_activations.py. Attention dropout replays its mask (the RNG state is kept).

Installed per attention module: its own forward runs inside a TorchFunctionMode that routes
`F.scaled_dot_product_attention` here, so the model must use transformers' "sdpa" attention (the default); nothing
global is changed and other modules or instances never see it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # storage dtype, largest magnitude


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales in the activation dtype where its range holds them (bf16, fp32), else fp32 (fp16's range is narrow)."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d) -> (8-bit values, one scale per row); x ≈ values · scale."""
    dtype, qmax = FORMATS[fmt]
    sdt = scale_dtype(x.dtype)
    amax = x.detach().abs().amax(-1, keepdim=True).to(torch.float32)
    scale = (amax / qmax).to(sdt).clamp_min(torch.finfo(sdt).tiny)  # rounded first: values are divided by it
    y = (x.detach().to(torch.float32) / scale.to(torch.float32)).clamp(-qmax, qmax)
    return (y.round() if fmt == "int8" else y).to(dtype), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def _rng_states(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class QuantizedSDPAFn(torch.autograd.Function):
    """out = SDPA(q, k, v); saves 8-bit q, k, v and their scales (and the RNG state when dropout is on)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, fmt):
        rng = _rng_states(q.device) if dropout_p > 0 else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        saved = [t for x in (q, k, v) for t in quantize(x, fmt)]
        ctx.save_for_backward(*saved, attn_mask if isinstance(attn_mask, torch.Tensor) else None)
        ctx.args = (dropout_p, is_causal, scale, enable_gqa, rng, (q.dtype, k.dtype, v.dtype))
        return out

    @staticmethod
    def backward(ctx, dout):
        qv, qs, kv, ks, vv, vs, attn_mask = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, rng, dtypes = ctx.args
        needs = ctx.needs_input_grad[:3]
        if torch.compiler.is_compiling() and dropout_p == 0:  # traceable: attention's backward written out
            q, k, v = (dequantize(val, sc, dt) for val, sc, dt in zip((qv, kv, vv), (qs, ks, vs), dtypes, strict=True))
            grads = attention_backward(q, k, v, dout, attn_mask, is_causal, scale, enable_gqa)
            return (*(g if need else None for g, need in zip(grads, needs, strict=True)),) + (None,) * 6
        inputs = [dequantize(val, sc, dt).requires_grad_(need)
                  for val, sc, dt, need in zip((qv, kv, vv), (qs, ks, vs), dtypes, needs, strict=True)]
        devices = [inputs[0].device] if rng is not None and rng[1] is not None else []
        replay = torch.random.fork_rng(devices=devices) if rng is not None else contextlib.nullcontext()
        with torch.enable_grad(), replay:
            if rng is not None:  # the same dropout mask as the forward
                torch.set_rng_state(rng[0])
                if devices:
                    torch.cuda.set_rng_state(rng[1], devices[0])
            out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
            grads = iter(torch.autograd.grad(out, wanted, dout) if wanted else ())
        dq, dk, dv = (next(grads) if need else None for need in needs)
        return dq, dk, dv, None, None, None, None, None, None


BACKWARD_CHUNK_BYTES = 64 << 20  # the written-out backward materialises the scores this many bytes at a time


def attention_backward(q, k, v, dout, attn_mask, is_causal: bool, scale, enable_gqa: bool):
    """dq, dk, dv of out = softmax(q kᵀ·scale + mask) v, a block of query rows at a time (fp32 scores).

    q (B, h, T, d); k, v (B, h_kv, S, d); the same masking rules as SDPA (causal: top-left aligned)."""
    h, hk, T, S = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    rep = h // hk if enable_gqa and h != hk else 1
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    qf, kf, vf, gf = q.float(), k.float(), v.float(), dout.float()
    rows = max(1, min(T, BACKWARD_CHUNK_BYTES // max(1, 3 * 4 * q[..., :1, :1].numel() * S)))
    dq, dk, dv = [], torch.zeros_like(kf), torch.zeros_like(vf)
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        s = (qf[..., t0:t1, :] @ kf.transpose(-1, -2)) * scale  # (B, h, rows, S)
        if is_causal:
            keep = torch.ones(t1 - t0, S, dtype=torch.bool, device=q.device).tril(diagonal=t0)
            s = s.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[..., t0:t1, :] if attn_mask.shape[-2] == T else attn_mask
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        p = torch.softmax(s, dim=-1)
        g = gf[..., t0:t1, :]
        dv = dv + p.transpose(-1, -2) @ g
        dp = g @ vf.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        dq.append(ds @ kf)
        dk = dk + ds.transpose(-1, -2) @ qf[..., t0:t1, :]
    dq = torch.cat(dq, dim=-2)
    if rep > 1:  # each kv head served `rep` query heads: their gradients add
        dk = dk.unflatten(-3, (hk, rep)).sum(-3)
        dv = dv.unflatten(-3, (hk, rep)).sum(-3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def quantized_sdpa(fmt: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """F.scaled_dot_product_attention's signature, keeping 8-bit q, k, v for backward."""
    return QuantizedSDPAFn.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, fmt)


class RouteSDPA(TorchFunctionMode):
    """While active (one attention module's forward), F.scaled_dot_product_attention keeps 8-bit inputs."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled():
            return quantized_sdpa(self.fmt, *args, **kwargs)
        return func(*args, **kwargs)
