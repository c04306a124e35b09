"""Chunked linear cross-entropy for causal-LM heads: the N × V logits never live at once.

transformers computes `logits = lm_head(hidden)` for every token, upcasts them to fp32 and takes the cross-entropy,
so a step keeps N × V × (2 + 4) bytes (plus their gradient at the start of backward). With the chunked loss the
model's own forward runs unchanged except that, when it is called with `labels` while autograd records, its
`lm_head` hands the hidden states through and its loss function computes

    loss = Σ_chunks CE(lm_head(hidden[chunk]).float(), shifted labels[chunk]) / (non-ignored count or num_items_in_batch)

chunk by chunk, recomputing each chunk's logits in backward. Label shifting, ignore_index, `shift_labels` and
`num_items_in_batch` follow transformers' `ForCausalLMLoss`; the loss and every gradient equal the plain model's
(fp32: to rounding). The output's `logits` is None in those calls; without labels (or under no_grad) the model
returns its logits as usual. Installed per instance (`forward` of the model, checked at wrap time against the
model's own loss on a random batch); `remove` restores it.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BypassedWeightError
from .base import compute_dtype
from .linear import CompressedLinear

LOSS_ATTR = "_memwrap_chunked_loss"  # on a model with the chunked loss: the chunk size in rows


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (transformers' get_output_embeddings), None for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


class _ChunkedLinearCE(torch.autograd.Function):
    """Σ over rows of CE(x Wᵀ + b, t) / divisor, `chunk` rows at a time; saves x (N, H) and the targets only.

    A compressed head (memwrap's CompressedLinear) passes its coords and x̃ = compress(x) (N, c, r): its weight
    gradient then lands in coords as G_s = Σ_chunks dlogitsᵀ x̃ (V, c, r), like every compressed linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, divisor, chunk, ignore_index, coords=None, x_tilde=None):
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            logits = F.linear(x[s:s + chunk], weight, bias).float()  # (C, V) as the model computes them
            total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(x, weight, bias, targets, divisor, x_tilde)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        ctx.coords_meta = None if coords is None else (coords.shape, coords.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, targets, divisor, x_tilde = ctx.saved_tensors
        scale = (grad / divisor).float()
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        dcoords = None
        if ctx.coords_meta is not None and ctx.needs_input_grad[7]:
            dcoords = torch.zeros(weight.shape[0], x_tilde.shape[1] * x_tilde.shape[2], dtype=torch.float32,
                                  device=weight.device)  # (V, c·r)
        for s in range(0, x.shape[0], ctx.chunk):
            xs, ts = x[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            logits = F.linear(xs, weight, bias).float()
            probs = torch.softmax(logits, dim=-1)  # d CE / d logits = softmax − onehot, 0 for ignored rows
            valid = (ts != ctx.ignore_index).unsqueeze(1)  # (C, 1); no boolean indexing: static shapes to compile
            probs = probs.scatter_add(1, torch.where(valid, ts.unsqueeze(1), 0), -valid.to(probs.dtype)) * valid
            g = (probs * scale).to(x.dtype)  # the fp32 upcast's backward casts back to the logits' dtype
            if dx is not None:
                dx[s:s + ctx.chunk] = g @ weight.to(g.dtype)
            if dw is not None:
                dw += g.float().T @ xs.float()
            if db is not None:
                db += g.float().sum(0)
            if dcoords is not None:
                xt = x_tilde[s:s + ctx.chunk]
                dcoords += (g.to(xt.dtype).T @ xt.reshape(xt.shape[0], -1)).float()
        if dcoords is not None:
            shape, dtype = ctx.coords_meta
            dcoords = dcoords.reshape(shape).to(dtype)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, dcoords, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, chunk: int,
                                 num_items_in_batch=None, ignore_index: int = -100,
                                 shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss(head(hidden), labels, ...) without materialising the logits.

    head: an nn.Linear, or memwrap's CompressedLinear (its weight gradient goes to its coords)."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    x = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets = shift_labels.reshape(-1).to(x.device)
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=x.device).float()
    coords = x_tilde = None
    if isinstance(head, CompressedLinear):
        head.check_pending()
        if torch.is_grad_enabled() and head.coords.requires_grad:
            coords = head.coords
            x_tilde = head.compress_input(x, compute_dtype(x))
    return _ChunkedLinearCE.apply(x, head.weight, head.bias, targets, divisor, chunk, ignore_index, coords, x_tilde)


class _Passing:
    """Whether the model's forward is inside a chunked-loss call (one flag shared by the head and the loss)."""

    def __init__(self):
        self.on = False


class HeadForward:
    """lm_head's `forward` while the chunked loss is installed: inside a chunked-loss call it hands the hidden
    states through (the loss applies the head), otherwise it is the head's own forward. Installed once, never
    swapped per call, so torch.compile traces one flag read instead of attribute churn."""

    def __init__(self, head: nn.Module, passing: _Passing):
        self.head, self.passing = head, passing

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.head).forward.__get__(self.head))

    def __call__(self, hidden_states, *args, **kwargs):
        if self.passing.on:
            return hidden_states
        return type(self.head).forward(self.head, hidden_states, *args, **kwargs)


class LossFunction:
    """The model's `loss_function` while the chunked loss is installed: the chunked cross-entropy on the hidden
    states inside a chunked-loss call, the model's own loss otherwise."""

    def __init__(self, model: nn.Module, head: nn.Module, chunk: int, passing: _Passing, previous):
        self.model, self.head, self.chunk, self.passing, self.previous = model, head, chunk, passing, previous

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 **kwargs):
        if self.passing.on:
            return chunked_linear_cross_entropy(logits, self.head, labels, chunk=self.chunk,
                                                num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                                shift_labels=shift_labels)
        own = self.previous if self.previous is not None else _default_loss(self.model)
        return own(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)


def _default_loss(model: nn.Module):
    """What transformers' `loss_function` property gives a model without `_loss_function` set."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING.get(getattr(model, "loss_type", None) or "ForCausalLM", LOSS_MAPPING["ForCausalLM"])


class ChunkedLossForward:
    """The model's `forward` with the chunked loss (picklable: it holds the model, the chunk size and the flag)."""

    def __init__(self, model: nn.Module, chunk: int, passing: _Passing | None = None):
        self.model, self.chunk = model, chunk
        self.passing = passing or _Passing()
        self.active = True  # False once removed (another wrapper, e.g. TRL's forward, may still call this one)

    @property
    def __signature__(self) -> inspect.Signature:  # the Trainer reads forward's parameters to keep dataset columns
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, *args, **kwargs):
        m = self.model
        own = functools.partial(type(m).forward, m)  # not __get__: older dynamo cannot trace it
        if kwargs.get("labels") is None or not torch.is_grad_enabled() or not self.active:
            return own(*args, **kwargs)
        self.passing.on = True
        try:
            out = own(*args, **kwargs)
        finally:
            self.passing.on = False
        if hasattr(out, "logits"):
            out.logits = None  # they were never computed: the hidden states went to the loss
        return out


def can_chunk(model: nn.Module) -> bool:
    """A causal LM whose loss is transformers' ForCausalLM and whose head is a plain (or compressed) linear layer."""
    head = output_head(model)
    plain = type(head) is nn.Linear or (isinstance(head, CompressedLinear) and not head.transposed)
    return plain and hasattr(type(model), "loss_function") \
        and getattr(getattr(model, "config", None), "is_encoder_decoder", False) is False \
        and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # GPT-2 names its causal LM so


def _same_loss(model: nn.Module, forward: ChunkedLossForward) -> bool:
    """The chunked loss equals the model's own on a random batch (catches heads that scale or cap logits)."""
    param = next(model.parameters())
    if param.device.type == "meta":
        return True
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(param.device)
    was_training = model.training
    model.eval()  # no dropout: both losses see the same forward
    try:
        with torch.enable_grad():
            own = type(model).forward(model, input_ids=ids, labels=ids).loss
            chunked = forward(input_ids=ids, labels=ids).loss
    except (TypeError, RuntimeError, ValueError, AttributeError):
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(own.float(), chunked.float(), rtol=1e-4, atol=0))


def install(model: nn.Module, chunk: int | None) -> bool:
    """Put the chunked loss on a causal LM (checked first); False when the model is not one it can serve."""
    if not chunk or not can_chunk(model) or LOSS_ATTR in model.__dict__:
        return False
    forward = ChunkedLossForward(model, int(chunk))
    head = model.get_output_embeddings()
    previous = model.__dict__.get("_loss_function")
    head.forward = HeadForward(head, forward.passing)
    model._loss_function = LossFunction(model, head, int(chunk), forward.passing, previous)
    if not _same_loss(model, forward):
        _uninstall_parts(model, head, previous)
        return False
    model.forward = forward
    object.__setattr__(model, LOSS_ATTR, int(chunk))
    object.__setattr__(model, FORWARD_ATTR, forward)
    return True


def _uninstall_parts(model: nn.Module, head: nn.Module, previous) -> None:
    if isinstance(head.__dict__.get("forward"), HeadForward):
        del head.forward
    if isinstance(model.__dict__.get("_loss_function"), LossFunction):
        if previous is None:
            del model._loss_function
        else:
            model._loss_function = previous


FORWARD_ATTR = "_memwrap_chunked_forward"  # the ChunkedLossForward installed (deactivated by `remove`)
GUARD_ATTR = "_memwrap_head_guard"  # the forward pre-hook that refuses TRL's fused head on a compressed lm_head


def _refuse_fused_head(model, args, kwargs):
    if kwargs.get("fused_lm_head"):
        raise BypassedWeightError(
            "this call asks for TRL's fused LM head (fused_lm_head=True: SFTTrainer and the other TRL trainers), which "
            "projects through lm_head.weight directly; memwrap compressed lm_head (its update arrives through its "
            "coords), so the head would silently never train. Wrap with head='exact' (TRL's fused head then computes the "
            "loss in chunks itself), or give the plan a larger budget.")


def guard_head(model: nn.Module) -> None:
    """With a compressed output head: refuse callers that bypass the head's forward (TRL's fused_lm_head=True)."""
    head = output_head(model)
    if isinstance(head, CompressedLinear) and GUARD_ATTR not in model.__dict__:
        handle = model.register_forward_pre_hook(_refuse_fused_head, with_kwargs=True)
        object.__setattr__(model, GUARD_ATTR, handle)


def remove(model: nn.Module) -> bool:
    guard = model.__dict__.pop(GUARD_ATTR, None)
    if guard is not None:
        guard.remove()
    if LOSS_ATTR not in model.__dict__:
        return False
    forward = model.__dict__.get(FORWARD_ATTR)
    if forward is not None:
        forward.active = False
        model.__dict__.pop(FORWARD_ATTR)
    loss_function = model.__dict__.get("_loss_function")
    _uninstall_parts(model, output_head(model), loss_function.previous if isinstance(loss_function, LossFunction)
                     else None)
    if isinstance(model.__dict__.get("forward"), ChunkedLossForward):
        del model.forward
    object.__delattr__(model, LOSS_ATTR)
    return True
