"""The adapter interface and the generic adapter (every float nn.Linear; siblings = same parent, same input width)."""

from __future__ import annotations

from torch import nn


class Adapter:
    """Describes one architecture family to memwrap."""

    name = "generic"
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter claims

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types

    siblings: tuple[tuple[str, ...], ...] = ()  # local names of linears that read one input tensor

    def sibling_key(self, name: str, module: nn.Module) -> str:
        """Layers with equal keys (and equal in_features, c, r) share one P and one saved x̃.

        Sharing is always safe: the saved x̃ is reused only when the very same input tensor arrives, so
        grouping layers that read different inputs costs nothing but a shared seed. A family's declared
        sibling sets name the groups; otherwise layers under one parent with one input width are grouped.
        """
        parent, _, local = name.rpartition(".")
        for group in self.siblings:
            if local in group:
                return f"{parent}:{'+'.join(group)}"
        weight = getattr(module, "weight", None)
        in_features = getattr(module, "in_features", None) or (weight.shape[0] if weight is not None else None)
        return f"{parent}:{in_features}"


    router_names: tuple[str, ...] = ("gate", "router", "shared_expert_gate", "switch")

    # Where a block keeps its parts, as local module names: the one place that says so for the family. The
    # whole-layer savings (norms, MLP, attention) find what to replace through `parts`.
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                   "post_feedforward_layernorm", "q_norm", "k_norm", "norm")
    mlp_names: tuple[str, ...] = ("mlp",)  # the MLP (or MoE block) of a decoder layer
    attention_names: tuple[str, ...] = ("self_attn",)

    def parts(self, model: nn.Module) -> dict[str, list[str]]:
        """Qualified names of the model's norms, MLPs and attention modules, found by the family's local names."""
        found: dict[str, list[str]] = {"norm": [], "mlp": [], "attention": []}
        for name, _ in model.named_modules():
            local = name.rpartition(".")[2]
            for kind, names in (("norm", self.norm_names), ("mlp", self.mlp_names), ("attention", self.attention_names)):
                if local in names:
                    found[kind].append(name)
        return found

    def is_router(self, name: str, module: nn.Module, parent: nn.Module | None) -> bool:
        """Routers (and scalar expert gates) of an MoE block stay exact: memwrap never compresses them."""
        *owners, local = name.split(".")
        if any(o in ("router", "routers") for o in owners):  # e.g. SwitchTransformers' router.classifier
            return True
        return local in self.router_names and parent is not None and hasattr(parent, "experts")


class GenericAdapter(Adapter):
    """Any model no family claims: every float nn.Linear (and Conv1D, and fused experts) memwrap finds."""

    def matches(self, model: nn.Module) -> bool:
        return True


ADAPTERS: list[Adapter] = []  # family adapters (filled by adapters/__init__.py); the generic one is the fallback


def resolve(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    return GenericAdapter()
