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
        inputs = [dequantize(val, sc, dt).requires_grad_(need)
                  for val, sc, dt, need in zip((qv, kv, vv), (qs, ks, vs), dtypes, needs, strict=True)]
        devices = [inputs[0].device] if rng is not None and rng[1] is not None else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices, enabled=rng is not None):
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
