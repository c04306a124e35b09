"""Predicted vs measured memory of a wrapped model, checked once after its first training step.

A plan made from a budget predicts the peak as named parts, for batch_size × seq_len tokens. After the first training
step memwrap measures what it can: on a GPU the peak allocated since the first training forward
(torch.cuda.max_memory_allocated); on a CPU the bytes that live through the step — weights, optimizer states (of the
optimizers holding the model's coords) and what the first training forward saved for backward — against the same
parts of the prediction, its activations scaled to the tokens the step really ran. Off by more than 10%, or more
tokens than planned: one warning. `memwrap.report(model)` prints both, part by part.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..compress import merge
from .measure import SavedTensorMeter, optimizer_state_bytes, storage_bytes

TOLERANCE = 0.10
COMPARED = ("weights", "optimizer states", "saved activations")  # the parts a CPU run can measure through a step
TOKEN_PARTS = ("saved activations", "logits", "largest transient")  # predicted parts that scale with the tokens


class Monitor:
    """Attached to a wrapped model whose plan has a predicted peak; its hooks remove themselves after one check."""

    def __init__(self, model: nn.Module, plan):
        self.plan = plan
        self.measured: dict[str, int] = {}
        self.checked = False
        self._meter: SavedTensorMeter | None = None
        self._forwards = 0
        self._cuda = None
        self.tokens: int | None = None  # tokens of the first training forward
        units = merge.units_of(model)
        self._unit = units[0] if units else None  # its step counter says when the first optimizer step has merged
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._meter is not None:  # a forward that raised: leave no hook behind
            self._meter.__exit__(None, None, None)
            self._meter = None

    def _training(self, model) -> bool:
        return model.training and torch.is_grad_enabled()

    def _before_forward(self, model, args, kwargs):
        if not self._training(model):
            return
        self._forwards += 1
        if self._forwards == 1:  # the first training forward: measure what it saves
            self.tokens = _tokens(args, kwargs)
            device = next(model.parameters()).device
            if device.type == "cuda":
                self._cuda = device
                torch.cuda.reset_peak_memory_stats(device)
            self._meter = SavedTensorMeter(model).__enter__()
        elif self._unit is not None and self._unit.steps > 0:  # the first optimizer step is done (accumulation too)
            self.check(model)

    def _after_forward(self, model, args, output):
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self.measured["saved activations"] = self._meter.bytes
            self._meter = None

    def predicted_at_run_tokens(self) -> dict[str, int]:
        """The plan's parts, its saved activations scaled from the planned tokens to those of the first step."""
        predicted = dict(self.plan.memory)
        planned = (self.plan.batch_size or 0) * (self.plan.seq_len or 0)
        if not (self.tokens and planned):
            return predicted
        for part in TOKEN_PARTS:  # these grow with the tokens; the peak moves by what they move
            if part in predicted:
                scaled = predicted[part] * self.tokens // planned
                if "peak" in predicted:
                    predicted["peak"] += scaled - predicted[part]
                predicted[part] = scaled
        return predicted

    def measure(self, model: nn.Module) -> dict[str, int]:
        """What lives now: weights (coords included where an optimizer writes into them; memwrap.optimizer releases
        them) and the optimizer states of the optimizers holding this model's
        coords; plus the first training forward's saved bytes and, on a GPU, the peak since then."""
        coords = {id(u.coords) for u in merge.units_of(model)}
        params = list(model.parameters())
        states = sum(optimizer_state_bytes(opt) for opt in list(merge._LINKS)
                     if any(id(p) in coords for g in opt.param_groups for p in g["params"]))
        out = dict(self.measured)
        out["weights"] = storage_bytes(params)
        out["optimizer states"] = states
        if self._cuda is not None:
            out["peak"] = torch.cuda.max_memory_allocated(self._cuda)
        return out

    def check(self, model: nn.Module) -> None:
        """Compare once; warn when the measured total is more than 10% off the prediction."""
        self.checked = True
        self.measured = self.measure(model)
        planned = (self.plan.batch_size or 0) * (self.plan.seq_len or 0)
        if self.tokens and planned and self.tokens > planned:
            warnings.warn(f"memwrap: the first training step ran {self.tokens} tokens; the plan was made for {planned} "
                          f"(batch_size {self.plan.batch_size} × seq_len {self.plan.seq_len}), so its predicted peak "
                          "does not hold for this run: wrap with batch_size= and seq_len= of the run. "
                          "memwrap.report(model) shows the measured parts.", stacklevel=3)
            self.remove()
            return
        predicted = self.predicted_at_run_tokens()
        if "peak" in self.measured:
            got, want, what = self.measured["peak"], predicted.get("peak", 0), "peak (max_memory_allocated)"
        else:
            got = sum(self.measured.get(k, 0) for k in COMPARED)
            want = sum(predicted.get(k, 0) for k in COMPARED)
            what = "weights + optimizer states + saved activations"
        if want and abs(got - want) > TOLERANCE * want:
            warnings.warn(f"memwrap: after the first step the measured {what} is {got / 1e9:.3f} GB, the plan predicted "
                          f"{want / 1e9:.3f} GB ({got / want - 1:+.0%}); memwrap.report(model) shows each part. The "
                          "batch or sequence length may differ from the plan's, or the model from the formulas.",
                          stacklevel=3)
        self.remove()


def report(model: nn.Module, monitor: Monitor | None, plan) -> str:
    """Predicted vs measured bytes per part, as a table (activations predicted at the tokens the run used)."""
    predicted = monitor.predicted_at_run_tokens() if monitor is not None else dict(plan.memory)
    measured = dict(monitor.measured) if monitor is not None else {}
    if monitor is not None and not monitor.checked:
        measured.update(monitor.measure(model))
    if not predicted:
        return "this plan has no memory prediction (rank/granularity were given); measured: " + \
            ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in measured.items())
    lines = [f"{'part':<22}{'predicted GB':>14}{'measured GB':>14}{'ratio':>8}"]
    for part, want in predicted.items():
        got = measured.get(part)
        ratio = f"{got / want:.2f}" if got is not None and want else "-"
        lines.append(f"{part:<22}{want / 1e9:>14.3f}{'-' if got is None else f'{got / 1e9:.3f}':>14}{ratio:>8}")
    if "peak" not in measured:
        lines.append("(on a CPU the peak is not measured here; measured parts are those that live through a step)")
    return "\n".join(lines)


def _tokens(args, kwargs) -> int | None:
    """Tokens of a forward call: input_ids (or inputs_embeds without its last dimension)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[:-1].numel() if isinstance(embeds, torch.Tensor) else None
