"""Predicted vs measured memory of a wrapped model: its parts after the first training step, and the phases of the
first step that has optimizer states (the steady state the plan's peak is).

Phases: a plan from a budget carries the simulated peak after each phase of its steady-state step (`plan.phases`).
The second training step (the first whose forward and backward run beside the optimizer states) is measured the
same way: on a GPU max_memory_allocated (and max_memory_reserved) with the peak reset at the step's start; on a CPU
the live storage bytes (memwrap.planning.simulate.LiveBytes, the simulator's own meter, for that one step). A phase
more than 10% above its prediction warns once, naming the phase. `memwrap.report(model)` prints both.

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
PHASE_FORWARDS = 64  # training forwards (gradient accumulation) the steady-state step may take before its optimizer step
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
        self.phases: dict[str, int] = {}  # measured peak after each phase of the steady-state step
        self.reserved: int | None = None  # on a GPU: max_memory_reserved over that step
        self._phase_live = None  # on a CPU: the LiveBytes meter of that step
        self._phase_handles: list = []
        self._phase_state = None  # None, "forward" (the step is being measured), "done"
        self._phase_from = 0

    def remove(self) -> None:
        for h in self._handles + self._phase_handles:
            h.remove()
        self._handles, self._phase_handles = [], []
        if self._meter is not None:  # a forward that raised: leave no hook behind
            self._meter.__exit__(None, None, None)
            self._meter = None
        self._stop_live()

    def _stop_live(self) -> None:
        live, self._phase_live = self._phase_live, None
        if live is not None:
            from torch.utils._python_dispatch import _get_current_dispatch_mode

            if _get_current_dispatch_mode() is live:  # only ours, innermost: never pop a mode the user entered since
                live.__exit__(None, None, None)

    def _training(self, model) -> bool:
        return model.training and torch.is_grad_enabled()

    def _before_forward(self, model, args, kwargs):
        if not self._training(model):
            return
        self._forwards += 1
        if self._phase_state == "forward" and self._forwards > self._phase_from + PHASE_FORWARDS:
            self.remove()  # no optimizer step came (an unusual loop): stop measuring rather than meter on forever
            return
        if self._forwards == 1:  # the first training forward: measure what it saves
            self.tokens = _tokens(args, kwargs)
            device = next(model.parameters()).device
            if device.type == "cuda":
                self._cuda = device
                torch.cuda.reset_peak_memory_stats(device)
            self._meter = SavedTensorMeter(model).__enter__()
        elif self._unit is not None and self._unit.steps > 0 and not self.checked:  # the first step is done
            self.check(model)
            if self._handles and not self._start_phases(model):  # nothing to measure phase by phase
                self.remove()

    def _after_forward(self, model, args, output):
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self.measured["saved activations"] = self._meter.bytes
            self._meter = None
        if self._phase_state == "forward":
            self.phases["forward"] = max(self.phases.get("forward", 0), self._read())

    # ---- the steady-state step, phase by phase ------------------------------------------------------------------
    def _read(self) -> int:
        if self._cuda is not None:
            return torch.cuda.max_memory_allocated(self._cuda)
        return self._phase_live.peak if self._phase_live is not None else 0

    def _start_phases(self, model) -> bool:
        optimizers = [opt for opt, link in list(merge._LINKS.items()) if link.holds_coords]
        if not self.plan.phases or not optimizers:
            return False
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)
        else:
            from .simulate import LiveBytes

            live = LiveBytes()
            states = [t for opt in optimizers for st in opt.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor)]
            live.add(list(model.parameters()) + list(model.buffers()) + states)
            live.reset_peak()
            self._phase_live = live.__enter__()
        self._phase_state = "forward"
        self._phase_from = self._forwards
        for opt in optimizers:
            self._phase_handles += [opt.register_step_pre_hook(self._before_step),
                                    opt.register_step_post_hook(self._after_step)]
        return True

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._phase_state == "forward":
            self.phases["backward"] = self._read()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._phase_state != "forward":
            return
        self.phases["optimizer"] = self._read()
        if self._cuda is not None:
            self.reserved = torch.cuda.max_memory_reserved(self._cuda)
        self._phase_state = "done"
        self.remove()
        self._check_phases()

    def predicted_phases(self) -> dict[str, int]:
        """The plan's simulated steady-state phases, scaled like its activations to the tokens the run used."""
        predicted = dict(self.plan.phases)
        planned = (self.plan.batch_size or 0) * (self.plan.seq_len or 0)
        acts = dict(self.plan.memory).get("saved activations", 0)
        if self.tokens and planned and acts:
            shift = acts * self.tokens // planned - acts
            predicted = {k: v + shift for k, v in predicted.items()}
        return predicted

    def _check_phases(self) -> None:
        predicted = self.predicted_phases()
        off = [(p, got, predicted[p]) for p, got in self.phases.items()
               if predicted.get(p) and got > (1 + TOLERANCE) * predicted[p]]
        if off:
            phase, got, want = max(off, key=lambda t: t[1] / t[2])
            warnings.warn(f"memwrap: in the first step with optimizer states the {phase} phase peaked at "
                          f"{got / 1e9:.3f} GB, the plan predicted {want / 1e9:.3f} GB ({got / want - 1:+.0%}); "
                          "memwrap.report(model) shows each phase. The batch, the sequence length or the training "
                          "loop may differ from the plan's.", stacklevel=4)

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
        if "peak" in self.measured and self.plan.phases:  # the steady-state step's phases are checked instead
            got = want = 0
            what = ""
        elif "peak" in self.measured:
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
        self._handles[0].remove()  # the pre-forward hook's work is done; the forward hook stays for the phases
        self._handles = self._handles[1:]


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
        lines.append("(measured parts are those that live through a step; the peak is measured phase by phase below)")
    if plan.phases:
        want = monitor.predicted_phases() if monitor is not None else dict(plan.phases)
        got = dict(monitor.phases) if monitor is not None else {}
        lines += ["", f"{'steady-state step':<22}{'predicted GB':>14}{'measured GB':>14}{'ratio':>8}"]
        for phase, w in want.items():
            g = got.get(phase)
            lines.append(f"{'after ' + phase:<22}{w / 1e9:>14.3f}{'-' if g is None else f'{g / 1e9:.3f}':>14}"
                         f"{f'{g / w:.2f}' if g is not None and w else '-':>8}")
        if monitor is not None and monitor.reserved is not None:
            lines.append(f"{'reserved (allocator)':<22}{'':>14}{monitor.reserved / 1e9:>14.3f}")
        if not got:
            lines.append("(measured in the first training step that has optimizer states, the second)")
    return "\n".join(lines)


def _tokens(args, kwargs) -> int | None:
    """Tokens of a forward call: input_ids (or inputs_embeds without its last dimension)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[:-1].numel() if isinstance(embeds, torch.Tensor) else None
