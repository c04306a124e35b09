"""The byte model: predicted peak memory of one training step, as named parts. Pure arithmetic.

The model's shape comes from its config (a bundled name, a local directory or a hub id, read through the
normal cache), and its weights are enumerated on the meta device with transformers' own classes, so nothing
is loaded. Saved activations are counted tensor by tensor, following what autograd keeps for backward in
the transformers implementations (sdpa attention, RMSNorm/LayerNorm, SiLU/GELU, routers, the loss):

    N = batch · seq tokens, H hidden, I intermediate, a = bytes per activation element, V vocab.

Every formula below names the op that saves the tensor; tests compare the sum with saved-tensor hooks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn

from ..compress.base import MERGE_BYTES_PER_ELEMENT, MERGE_CHUNK_BYTES
from ..compress.inject import is_conv1d, name_matches, tied_parameter_ids
from ..compress.loss import output_head
from ..compress.quant import weight_bytes as quant_weight_bytes
from ..config import ATTENTION_8BIT, LayerPlan, WrapConfig
from ..errors import InvalidSettingsError

DTYPES = {"fp32": (torch.float32, 4), "float32": (torch.float32, 4), "bf16": (torch.bfloat16, 2),
          "bfloat16": (torch.bfloat16, 2), "fp16": (torch.float16, 2), "float16": (torch.float16, 2)}
INDEX_BYTES = 8  # int64 indices (token ids, labels, top-k expert ids)
FP32 = 4
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "bert", "gpt2")

BUNDLED = {  # short name -> file in memwrap/configs (hand-written config.json of the public model)
    "llama-2-7b": "llama-2-7b.json",
    "meta-llama/llama-2-7b-hf": "llama-2-7b.json",
    "llama-2-13b": "llama-2-13b.json",
    "meta-llama/llama-2-13b-hf": "llama-2-13b.json",
    "llama-2-70b": "llama-2-70b.json",
    "meta-llama/llama-2-70b-hf": "llama-2-70b.json",
    "qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b.json",
    "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b.json",
    "mixtral-8x7b": "mixtral-8x7b.json",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b.json",
    "qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b.json",
}


def dtype_from_name(name: str) -> tuple[torch.dtype, int]:
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise InvalidSettingsError(f"dtype {name!r} is unknown; use one of fp32, bf16, fp16.") from None


def bundled_names() -> list[str]:
    return sorted({k for k in BUNDLED if "/" not in k})


def load_config(model: str):
    """A transformers config from a bundled name, a local directory / config.json, or a hub id (cache first)."""
    from transformers import AutoConfig

    key = model.strip().lower()
    if key in BUNDLED:
        text = resources.files("memwrap.planning.configs").joinpath(BUNDLED[key]).read_text(encoding="utf-8")
        data = json.loads(text)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if os.path.isfile(model) and model.endswith(".json"):
        with open(model, encoding="utf-8") as f:
            data = json.load(f)
        if "model_type" not in data:
            raise InvalidSettingsError(f"{model} has no model_type; is it a transformers config.json?")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    errors = []
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    offline = offline or model.startswith(("/", ".", "~")) or model.count("/") > 1  # a path, not a hub id
    hub_logger = logging.getLogger("huggingface_hub")  # its retry warnings would break "one line per error"
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        for local_only in ((True,) if offline else (True, False)):
            try:
                return AutoConfig.from_pretrained(model, local_files_only=local_only)
            except Exception as e:  # noqa: BLE001  (hub / filesystem errors of every kind)
                errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        hub_logger.setLevel(level)
    raise InvalidSettingsError(
        f"cannot read a config for model {model!r} ({errors[-1][:160]}); pass a local directory with a config.json, "
        f"a hub id that is cached or reachable, or a bundled name: {', '.join(bundled_names())}.")


def meta_model(config) -> nn.Module:
    """The model built from its config on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    with torch.device("meta"):
        for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise InvalidSettingsError(f"model type {config.model_type!r} has no causal- or masked-LM class in transformers.")


# ---- the shape of a model, read from its config -------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the activation formulas need, read from a config."""

    model_type: str
    family: str  # "decoder" (Llama-like, causal LM) | "encoder" (BERT-like, masked LM)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    vocab: int
    qk_norm: bool = False
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE shared expert (0: none)
    hidden_dropout: float = 0.0  # BERT's hidden_dropout_prob, GPT-2's resid_pdrop
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0  # GPT-2's embd_pdrop
    kv_cache_copies: bool = False  # GPT-2 with use_cache: its cache keeps a copy of every layer's k and v in training

    @property
    def exact_formulas(self) -> bool:
        """Whether the activation formulas were written (and tested) for this architecture."""
        return self.model_type in KNOWN_TYPES

    @classmethod
    def from_config(cls, config) -> ModelShape:
        g = lambda *names, default=0: next((getattr(config, n) for n in names  # noqa: E731
                                            if getattr(config, n, None) is not None), default)
        hidden = g("hidden_size", "d_model", "n_embd")
        heads = g("num_attention_heads", "n_head")
        layers = g("num_hidden_layers", "n_layer")
        mt = config.model_type
        family = "encoder" if mt in ("bert", "roberta", "distilbert", "electra", "xlm-roberta") else "decoder"
        num_experts = g("num_experts", "num_local_experts")
        moe_layers = 0
        if num_experts:
            step = g("decoder_sparse_step", default=1) or 1
            only = set(g("mlp_only_layers", default=[]) or [])
            moe_layers = sum(1 for i in range(layers) if i not in only and (i + 1) % step == 0)
        return cls(
            model_type=mt, family=family, hidden=hidden, layers=layers, heads=heads,
            kv_heads=g("num_key_value_heads", default=heads) or heads,
            head_dim=g("head_dim", default=hidden // heads) or hidden // heads,
            intermediate=g("intermediate_size", "n_inner", default=4 * hidden), vocab=g("vocab_size"),
            qk_norm=mt in ("qwen3", "qwen3_moe"), moe_layers=moe_layers, num_experts=num_experts,
            top_k=g("num_experts_per_tok", default=0),
            moe_intermediate=g("moe_intermediate_size", default=g("intermediate_size")) if num_experts else 0,
            shared_intermediate=g("shared_expert_intermediate_size", default=0),
            hidden_dropout=float(g("hidden_dropout_prob", "resid_pdrop", default=0.0) or 0.0)
            if family == "encoder" or mt == "gpt2" else 0.0,
            attention_dropout=float(g("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", default=0.0)
                                    or 0.0),
            embedding_dropout=float(g("embd_pdrop", default=0.0) or 0.0) if mt == "gpt2" else 0.0,
            kv_cache_copies=mt == "gpt2" and bool(getattr(config, "use_cache", False)),
        )


@dataclass(frozen=True)
class Weight:
    """A trainable parameter tensor and, when memwrap can compress it, its layer shape."""

    name: str
    numel: int
    kind: str = "other"  # "linear" | "experts" | "other"
    in_features: int = 0
    out_features: int = 0
    num_experts: int = 1
    group: str = ""
    has_bias: bool = False
    trainable: bool = True
    head: bool = False  # the causal LM's untied output head (a linear the planner may compress)


def enumerate_weights(model: nn.Module, exclude=("lm_head",)) -> list[Weight]:
    """Every distinct trainable parameter: compressible linears and fused experts named, the rest as "other"."""

    tied = tied_parameter_ids(model)
    out: list[Weight] = []
    taken: set[int] = set()
    head = output_head(model)
    for mname, mod in model.named_modules():
        if mod is head and type(mod) is nn.Linear and mname and id(mod.weight) not in tied:
            out.append(Weight(mname, mod.weight.numel(), "linear", mod.in_features, mod.out_features,
                              group=f":{mod.in_features}", has_bias=mod.bias is not None,
                              trainable=mod.weight.requires_grad, head=True))
            taken.add(id(mod.weight))
        elif type(mod) is nn.Linear and id(mod.weight) not in tied and not (exclude and name_matches(mname, exclude)):
            parent = mname.rsplit(".", 1)[0] if "." in mname else ""
            out.append(Weight(mname, mod.weight.numel(), "linear", mod.in_features, mod.out_features,
                              group=f"{parent}:{mod.in_features}", has_bias=mod.bias is not None,
                              trainable=mod.weight.requires_grad))
            taken.add(id(mod.weight))
        elif is_conv1d(mod) and id(mod.weight) not in tied and not (exclude and name_matches(mname, exclude)):
            m_, n_ = mod.weight.shape  # GPT-2 Conv1D stores W as (in, out)
            parent = mname.rsplit(".", 1)[0] if "." in mname else ""
            out.append(Weight(mname, mod.weight.numel(), "linear", m_, n_, group=f"{parent}:{m_}",
                              has_bias=mod.bias is not None, trainable=mod.weight.requires_grad))
            taken.add(id(mod.weight))
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter) and p.ndim == 3 and id(p) not in taken:
                e, a, b = p.shape  # [E, out, in] (transposed layouts carry is_transposed)
                n, m = (b, a) if getattr(mod, "is_transposed", False) else (a, b)
                out.append(Weight(f"{mname}.{pname}", p.numel(), "experts", m, n, num_experts=e,
                                  group=f"{mname}.{pname}"))
                taken.add(id(p))
    seen = set(taken)
    for pname, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(Weight(pname, p.numel(), trainable=p.requires_grad))
    return out


# ---- the estimate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Predicted bytes of one training step, by named part, and the peak they add up to."""

    parts: tuple[tuple[str, int], ...]
    peak_bytes: int
    saved_activation_bytes: int  # what autograd saves for backward (saved-tensor hooks measure this)
    details: dict = field(default_factory=dict, compare=False, hash=False)

    def part(self, name: str) -> int:
        return dict(self.parts)[name]


def _layer_settings(layers: tuple[LayerPlan, ...] | None) -> dict[str, LayerPlan]:
    return {lp.name: lp for lp in (layers or ())}


def trainable_bytes(weights: list[Weight], layers: tuple[LayerPlan, ...] | None, param_bytes: int,
                    optimizer: str = "adamw", coords_bytes: int = FP32) -> tuple[int, int]:
    """(gradient bytes, optimizer-state bytes) of every trainable parameter.

    With memwrap (layers given) a compressed weight trains through coords (E·n·c·r; their gradient in bf16 for a
    bf16 model, else fp32 — `coords_bytes`); memwrap.optimizer keeps their first moment in that dtype too; the bias
    stays trainable. optimizer: "adamw" (subspace AdamW: an fp32 second moment of coords' size) or "projfactor"
    (row/column second-moment factors, E·(n + m) fp32); every other parameter: AdamW, 2 moments of its dtype.
    """
    plan = _layer_settings(layers)
    grads = states = 0
    for w in weights:
        lp = plan.get(w.name)
        if not w.trainable:
            continue
        if lp is None:
            grads += w.numel * param_bytes
            states += 2 * w.numel * param_bytes
            continue
        grads += lp.coords_numel * coords_bytes
        states += lp.coords_numel * coords_bytes  # the first moment, in the coords' dtype
        if optimizer == "projfactor":  # row and column factors of the second moment
            states += lp.num_experts * (lp.out_features + lp.in_features) * FP32
        else:  # the second moment, fp32
            states += lp.coords_numel * FP32
    return grads, states


def _saved_input(names: list[str], plan: dict[str, LayerPlan], full_bytes_per_token: int, a: int,
                 exact_reader: bool = False) -> int:
    """Bytes per token saved for one input read by the linears `names` (siblings share x̃ at equal c, r)."""
    exact = exact_reader or any(n not in plan for n in names)
    total = full_bytes_per_token if exact else 0
    shared = {(plan[n].group, plan[n].c, plan[n].r) for n in names if n in plan}
    total += sum(c * r * a for _, c, r in shared)
    return total


def _layer_key(name: str) -> str:
    """The layer a qualified name lives in ("model.layers.3.mlp.up_proj" -> "model.layers.3."), "" outside layers."""
    parts = name.split(".")
    for j, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:j + 1]) + "."
    return ""


def _names(weights: list[Weight], prefix: str, suffixes: tuple[str, ...]) -> list[str]:
    return [w.name for w in weights if w.kind == "linear" and w.name.startswith(prefix)
            and w.name.rsplit(".", 1)[-1] in suffixes]


PLAIN_SAVINGS = {"norms": "keep", "mlp": "keep", "attention": "keep", "checkpoint_layers": ()}


def saved_activations(shape: ModelShape, weights: list[Weight], layers: tuple[LayerPlan, ...] | None,
                      batch_size: int, seq_len: int, dtype_bytes: int,
                      gradient_checkpointing: bool = False, savings: dict | None = None) -> dict[str, int]:
    """Bytes autograd keeps for backward after one forward, by part (see the module docstring).

    savings: the block options of a memwrap Plan (`plan.savings`: norms, mlp, attention, checkpoint_layers);
    None is what wrap applies by default when `layers` are given, and plain training when they are not.
    """
    s = shape
    B, T, a = batch_size, seq_len, dtype_bytes
    N = B * T
    H, nh, nkv, hd = s.hidden, s.heads, s.kv_heads, s.head_dim
    plan = _layer_settings(layers)
    if layers is None:
        sv = dict(PLAIN_SAVINGS)
    else:
        defaults = WrapConfig()
        sv = {k: getattr(defaults, k) for k in PLAIN_SAVINGS} | dict(savings or {})
    norms_kept = sv["norms"] == "keep"
    f32_copy = FP32 if a < FP32 else 0  # RMSNorm upcasts its input (and keeps the upcast) below fp32
    # below fp32 the plain norm keeps the upcast, not the input; a recomputed norm keeps exactly its input
    norm_input = a if (a >= FP32 or not norms_kept) else 0

    def rms_norm(width: int, rows: int) -> int:  # rsqrt (rows × 1, fp32), x.float() below fp32, weight·h saves h
        # recomputed: the input (counted by its maker), and below fp32 (memwrap's RMSNorm function) the rsqrt per row
        return rows * (FP32 + width * (f32_copy + a)) if norms_kept else rows * FP32 if a < FP32 else 0

    def layer_norm(width: int, rows: int) -> int:  # mean and rstd per row (input dtype on CPU); input counted by its maker
        return rows * 2 * a

    parts = {"compressed inputs": 0, "linear inputs (exact)": 0, "attention": 0, "norms": 0,
             "mlp activations": 0, "router": 0, "experts": 0, "residual stream": 0, "logits/loss": 0, "embeddings": 0}

    consumed: set[str] = set()
    index: dict[str, list[Weight]] = {}  # weights by the layer they live in: each layer looks at its own only
    for w in weights:
        index.setdefault(_layer_key(w.name), []).append(w)

    def names(prefix: str, suffixes: tuple[str, ...]) -> list[str]:
        return _names(index.get(_layer_key(prefix), []), prefix, suffixes)

    def add_input(names, width, exact_reader=False):
        consumed.update(names)
        per_tok = _saved_input(names, plan, width * a, a, exact_reader)
        comp = sum(c * r * a for _, c, r in {(plan[n].group, plan[n].c, plan[n].r) for n in names if n in plan})
        parts["compressed inputs"] += N * comp
        parts["linear inputs (exact)"] += N * (per_tok - comp)

    scale_b = a if a in (2, FP32) else FP32  # an 8-bit row's scale: bf16 or fp32 (fp16 activations: fp32 scales)

    def quantized(rows: int, width: int) -> int:  # attention="int8"/"fp8": 8-bit values and one scale per row
        return rows * (width + scale_b)

    def recomputed(since: dict, part: str) -> None:
        """A region recomputed in backward: drop what it kept since `since`, keep only its input (N × H)."""
        parts.update(since)
        parts[part] += N * H * a

    which = sv["checkpoint_layers"]
    chosen = set(range(s.layers)) if which == "all" else set(which)
    # a checkpointed layer keeps its norm and act(gate)·up savings (nested), not an MLP or attention recompute
    attention_rc = lambda i: sv["attention"] == "recompute" and i not in chosen  # noqa: E731
    quant = lambda i: sv["attention"] in ATTENTION_8BIT and i not in chosen  # noqa: E731
    mlp_rc = lambda i: sv["mlp"] == "recompute" and i not in chosen  # noqa: E731
    act_recompute = sv["mlp"] in ("act", "recompute")
    parts["embeddings"] += N * INDEX_BYTES  # embedding saves the token ids
    per_layer: list[dict[str, int]] = []
    if s.model_type == "gpt2":  # GPT-2: LayerNorm, fused c_attn (Conv1D), Python GELU, dropout after each sublayer
        cache = 0  # k and v copies the cache keeps, where sdpa saves them (a recomputed region passes no cache)
        mask = N * H * a if s.hidden_dropout > 0 else 0  # nn.Dropout keeps its (scaled) mask in the input's dtype
        parts["embeddings"] += T * INDEX_BYTES + (N * H * a if s.embedding_dropout > 0 else 0)  # position ids, mask
        I_ = s.intermediate
        for i in range(s.layers):
            before = dict(parts)
            pre = f"transformer.h.{i}."
            parts["residual stream"] += N * H * a  # ln_1's input
            parts["norms"] += layer_norm(H, N)
            attention_start = dict(parts)
            add_input(names(pre + "attn.", ("c_attn",)), H)
            if quant(i):  # 8-bit q, k, v; c_proj keeps its own input (x̃, or the output itself when exact)
                parts["attention"] += 3 * quantized(N * nh, hd)
                add_input(names(pre + "attn.", ("c_proj",)), H)
            else:  # sdpa keeps q, k, v (views of c_attn's output), its output (c_proj's input) and the logsumexp
                parts["attention"] += 3 * N * H * a + N * H * a + B * nh * T * FP32
                add_input(names(pre + "attn.", ("c_proj",)), 0)  # exact: the sdpa output itself
            parts["residual stream"] += mask
            if attention_rc(i):  # GPT2Attention keeps ln_1's output
                recomputed(attention_start, "attention")
            elif s.kv_cache_copies and not quant(i) and i not in chosen:  # kept by sdpa (8-bit attention keeps
                # its own copies)
                cache += 2 * N * H * a
            parts["residual stream"] += N * H * a  # ln_2's input
            parts["norms"] += layer_norm(H, N)
            mlp_start = dict(parts)
            add_input(names(pre + "mlp.", ("c_fc",)), H)
            # GELU (tanh form, Python ops) keeps its input, its tanh, x/2 and 1 + tanh; recomputed: its input only
            parts["mlp activations"] += (1 if act_recompute else 4) * N * I_ * a
            add_input(names(pre + "mlp.", ("c_proj",)), I_)  # the GELU output
            parts["residual stream"] += mask
            if mlp_rc(i):  # GPT2MLP keeps ln_2's output
                recomputed(mlp_start, "mlp activations")
            per_layer.append({k: parts[k] - before[k] for k in parts})
        parts["residual stream"] += N * H * a  # ln_f's input
        parts["norms"] += layer_norm(H, N)
        lm_in = N * H * a  # the (tied, exact) head keeps ln_f's output
        if cache:
            parts["kv cache (use_cache)"] = cache
    elif s.family == "decoder":
        parts["attention"] += 2 * T * hd * a  # RoPE cos and sin (1, T, hd), computed once, saved by every layer's mul
        if any(attention_rc(i) for i in range(s.layers)) or chosen:  # recomputed calls keep the position ids
            parts["attention"] += T * INDEX_BYTES
        use_gqa_repeat = False  # sdpa takes enable_gqa when there is no mask (training on full sequences)
        moe_every = (s.layers // s.moe_layers) if s.moe_layers else 0
        for i in range(s.layers):
            before = dict(parts)
            pre = f"model.layers.{i}."
            parts["residual stream"] += N * H * norm_input  # this layer's input (the previous add, or the embedding)
            parts["norms"] += rms_norm(H, N)
            attention_start = dict(parts)
            add_input(names(pre, ("q_proj", "k_proj", "v_proj")), H)
            q, k = N * nh * hd * a, N * nkv * hd * a
            att = 0
            if s.qk_norm:  # q_norm / k_norm over head_dim: keep q_proj/k_proj outputs (plus internals unless recomputed)
                att += (q + k) * norm_input // a
                parts["norms"] += rms_norm(hd, N * nh) + rms_norm(hd, N * nkv)
            if quant(i):  # 8-bit q, k, v with a scale per row; o_proj keeps its own input (x̃, or exact)
                kv_rows = N * (nh if use_gqa_repeat else nkv)
                att += quantized(N * nh, hd) + 2 * quantized(kv_rows, hd)
                parts["attention"] += att
                add_input(names(pre, ("o_proj",)), H)
            else:
                att += (q + k) + N * nkv * hd * a  # sdpa saves q_embed, k_embed, v (RoPE's mul saves only cos/sin)
                if use_gqa_repeat:
                    att += 2 * (nh - nkv) * N * hd * a
                att += N * nh * hd * a + B * nh * T * FP32  # sdpa output and logsumexp
                parts["attention"] += att
                add_input(names(pre, ("o_proj",)), 0)  # exact: the sdpa output itself (already counted)
            if attention_rc(i):
                recomputed(attention_start, "attention")
            parts["residual stream"] += N * H * norm_input  # attention residual add
            parts["norms"] += rms_norm(H, N)
            mlp_start = dict(parts)
            is_moe = bool(s.moe_layers) and (i + 1) % max(moe_every, 1) == 0 and any(
                w.name.startswith(pre + "mlp.experts") or w.name.startswith(pre + "block_sparse_moe.experts")
                for w in index.get(pre, []))
            if is_moe:
                E, k_, Im = s.num_experts, s.top_k, s.moe_intermediate
                R = N * k_  # routed (token, expert) rows
                # router: linear saves its input (the norm output, exact), softmax (fp32) output, topk ids,
                # the renormalisation's divisor and result, the gathered routing weight per row
                parts["router"] += N * H * a + N * E * FP32 + N * k_ * INDEX_BYTES
                exp_names = [w.name for w in index.get(pre, []) if w.kind == "experts"]
                gu = next((n for n in exp_names if n.endswith("gate_up_proj")), None)
                dn = next((n for n in exp_names if n.endswith("down_proj")), None)
                ex = 3 * R * INDEX_BYTES + E * FP32 + R * a  # row/slot ids, group offsets, gathered routing weight
                ex += R * (plan[gu].c * plan[gu].r * a if gu in plan else H * a)  # gate_up input (gathered tokens)
                # gate_up output (act saves gate, mul saves up), act output; recomputed: the gate_up output only
                ex += R * 2 * Im * a + (0 if act_recompute else R * Im * a)
                ex += R * (plan[dn].c * plan[dn].r * a if dn in plan else Im * a)  # down input
                ex += R * H * a  # down output, saved by the routing-weight mul
                parts["experts"] += ex
                if s.shared_intermediate:
                    sh = pre + "mlp.shared_expert."
                    # the shared expert reads the router's input (saved by the router anyway): only x̃ adds
                    add_input(names(sh, ("gate_proj", "up_proj")) + names(pre + "mlp.",
                                                                                     ("shared_expert_gate",)), 0)
                    parts["mlp activations"] += (2 if act_recompute else 3) * N * s.shared_intermediate * a
                    add_input(names(sh, ("down_proj",)), s.shared_intermediate)
                    parts["mlp activations"] += N * a + N * H * a  # sigmoid output, shared expert output
            else:
                Id = s.intermediate
                add_input(names(pre + "mlp.", ("gate_proj", "up_proj")), H)
                # gate out (SiLU), SiLU out and up out (the mul); with act(gate)·up recomputed: gate and up only
                parts["mlp activations"] += (2 if act_recompute else 3) * N * Id * a
                add_input(names(pre + "mlp.", ("down_proj",)), Id)
            if mlp_rc(i):
                recomputed(mlp_start, "mlp activations")
            per_layer.append({k: parts[k] - before[k] for k in parts})
        parts["residual stream"] += N * H * norm_input  # the last add, saved by the final norm
        parts["norms"] += rms_norm(H, N)
        lm_in = N * H * a  # lm_head (exact) saves the final norm's output
    else:  # encoder (BERT): embeddings LayerNorm + dropout, post-norm layers, MLM head
        mask = N * H * a if s.hidden_dropout > 0 else 0  # dropout keeps its (scaled) mask in the input's dtype
        parts["embeddings"] += T * INDEX_BYTES + N * H * a + mask  # position ids, sum (LayerNorm's input)
        parts["norms"] += layer_norm(H, N)
        bert = "bert" if any(w.name.startswith("bert.") for w in weights) else s.model_type
        for i in range(s.layers):
            before = dict(parts)
            pre = f"{bert}.encoder.layer.{i}."
            attention_start = dict(parts)
            add_input(names(pre + "attention.self.", ("query", "key", "value")), H)  # the layer input
            if quant(i):  # 8-bit q, k, v; the output dense keeps its own input (x̃, or exact)
                parts["attention"] += 3 * quantized(N * nh, hd)
                add_input(names(pre + "attention.output.", ("dense",)), H)
            else:
                parts["attention"] += 4 * N * H * a + B * nh * T * FP32  # sdpa: q, k, v, output, logsumexp
                if s.attention_dropout > 0:  # dropout in sdpa: the math path keeps the probabilities and the mask
                    parts["attention"] += B * nh * T * T * (2 * a)
                add_input(names(pre + "attention.output.", ("dense",)), 0)  # exact: the sdpa output itself
            parts["residual stream"] += N * H * a + mask  # add (LayerNorm's input), dropout mask
            parts["norms"] += layer_norm(H, N)
            if attention_rc(i):  # BertAttention (self-attention, output dense, LayerNorm) keeps its input
                recomputed(attention_start, "attention")
            mlp_start = dict(parts)
            add_input(names(pre + "intermediate.", ("dense",)), H)
            parts["mlp activations"] += N * s.intermediate * a  # dense output, saved by GELU
            if mlp_rc(i):  # BertIntermediate (dense + GELU) keeps its input
                recomputed(mlp_start, "mlp activations")
            add_input(names(pre + "output.", ("dense",)), s.intermediate)  # GELU output
            parts["residual stream"] += N * H * a + mask
            parts["norms"] += layer_norm(H, N)
            per_layer.append({k: parts[k] - before[k] for k in parts})
        add_input(names("cls.predictions.transform.", ("dense",)), H)
        parts["mlp activations"] += N * H * a + N * H * a  # dense output (GELU), GELU output (LayerNorm)
        parts["norms"] += layer_norm(H, N)
        lm_in = N * H * a  # the (tied, exact) decoder saves the transform's output
    # logits/loss: the output projection's input, log_softmax output (fp32), the labels
    # linears the family formulas did not name (another architecture): each saves its input (or its x̃)
    rest = [w for w in weights if w.kind == "linear" and w.name not in consumed and w.trainable and not w.head]
    by_group: dict[str, list[Weight]] = {}
    for w in rest:
        by_group.setdefault(w.group, []).append(w)
    for group in by_group.values():
        add_input([w.name for w in group], group[0].in_features)
    loss_bytes = FP32 if s.family == "decoder" else a  # causal-LM loss upcasts the logits; BERT's MLM loss does not
    head = next((w.name for w in weights if w.head and w.name in plan), None)
    head_x = N * plan[head].c * plan[head].r * a if head else 0  # a compressed head's x̃
    if sv.get("loss_chunk") and s.family == "decoder":  # chunked loss: the head's input and the shifted targets
        parts["logits/loss"] += lm_in + head_x + 2 * N * INDEX_BYTES + 2 * FP32
    elif head:  # a compressed head saves x̃ instead of its input
        parts["logits/loss"] += head_x + N * s.vocab * loss_bytes + N * INDEX_BYTES + loss_bytes
    else:
        parts["logits/loss"] += lm_in + N * s.vocab * loss_bytes + N * INDEX_BYTES + loss_bytes  # + the loss scalar
    chosen = sorted(i for i in chosen if i < len(per_layer))
    if chosen and not gradient_checkpointing:  # those layers keep only their input; the largest lives again in backward
        for i in chosen:
            for k, v in per_layer[i].items():
                parts[k] -= v
        parts["layer inputs (checkpointed)"] = len(chosen) * N * H * a
        return {**parts, "_recompute": max(sum(per_layer[i].values()) for i in chosen)}
    if gradient_checkpointing:
        # only each layer's input is kept; one layer's activations live again during its recomputation
        layer_total = sum(per_layer[0].values()) if per_layer else 0
        kept = sum(parts.values()) - sum(sum(p.values()) for p in per_layer)
        parts = {"layer inputs (checkpointed)": len(per_layer) * N * H * a, "rest": kept}
        return {**parts, "_recompute": layer_total}
    return parts


@dataclass(frozen=True)
class ZeroSpec:
    """DeepSpeed ZeRO as the planner counts it, per rank: stage 1 partitions the fp32 master copy and the optimizer
    moments over `world_size` ranks, stage 2 the gradients too, stage 3 the (16-bit) parameters too; `offload` keeps
    the master and moments in CPU memory instead."""

    stage: int
    world_size: int = 1
    offload: bool = False

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage} over {self.world_size} rank(s)" + (", optimizer offloaded to the CPU"
                                                                                 if self.offload else "")


ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements): ZeRO-2/3 reduce buffer


def zero_bytes(weights: list[Weight], layers: tuple[LayerPlan, ...] | None, param_bytes: int,
               zero: ZeroSpec) -> tuple[int, int, int, int, int]:
    """(parameter, gradient, optimizer-state, offloaded, transient) bytes on one rank under DeepSpeed ZeRO.

    DeepSpeed optimizes every trainable parameter through a flat fp32 master copy (4 bytes) and AdamW's two fp32
    moments (8 bytes), partitioned over the ranks from stage 1 (in CPU memory with `offload`); the gradients are
    16-bit (the parameters' dtype), partitioned from stage 2, plus the fp32 gradient partition the step reads; the
    parameters themselves are partitioned at stage 3. Under memwrap the trainable parameters of a wrapped layer are
    its coords (its frozen W is a parameter like any other: replicated below stage 3, partitioned at it)."""
    plan = _layer_settings(layers)
    frozen = trainable = 0
    for w in weights:
        lp = plan.get(w.name)
        if lp is not None:
            frozen += w.numel
            trainable += lp.coords_numel
        elif w.trainable:
            trainable += w.numel
        else:
            frozen += w.numel
    world = max(1, zero.world_size)

    def part(n: int, from_stage: int) -> int:
        return -(-n // world) if zero.stage >= from_stage else n

    params = (part(frozen, 3) + part(trainable, 3)) * param_bytes
    grads = part(trainable, 2) * param_bytes
    if param_bytes != FP32:  # the fp32 gradient partition the step reads
        grads += part(trainable, 1) * FP32
    master_and_moments = part(trainable, 1) * 3 * FP32
    states, offloaded = (0, master_and_moments) if zero.offload else (master_and_moments, 0)
    transient = min(ZERO_REDUCE_BUCKET, trainable) * param_bytes if zero.stage >= 2 else 0
    if zero.stage >= 3:  # forward and backward gather one layer's parameters whole
        transient += max((w.numel for w in weights), default=0) * param_bytes
    return params, grads, states, offloaded, transient


def logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    return tokens * shape.vocab * dtype_bytes


def estimate(shape: ModelShape, weights: list[Weight], layers: tuple[LayerPlan, ...] | None, *, batch_size: int,
             seq_len: int, dtype_bytes: int, param_bytes: int | None = None, optimizer: str = "adamw",
             gradient_checkpointing: bool = False, chunked_cross_entropy: bool = False,
             ce_chunk_tokens: int = 1024, savings: dict | None = None, coords_bytes: int = FP32,
             zero: ZeroSpec | None = None, weight_format: str = "keep") -> Estimate:
    """Predicted peak of one training step (forward, backward, optimizer step) with the given layer settings.

    layers=None is plain training (every weight exact). The peak is the larger of the end of forward
    (weights + optimizer states + saved activations + live logits + the largest transient) and the
    optimizer step (weights + gradients + states). Coords take no bytes of their own: memwrap.optimizer, which the
    plan names, releases their storage (they stay zero under it) and keeps only their gradient (`coords_bytes` each).
    zero: the bytes of one rank under DeepSpeed ZeRO instead (`zero_bytes`; its AdamW steps the coords).
    weight_format: "int8"/"fp8": every compressed weight but the output head is stored in 8 bits with float32 block
    scales (memwrap.compress.quant), and forward and backward dequantize one of them at a time (a transient).
    """
    pb = param_bytes or dtype_bytes
    N = batch_size * seq_len
    zero_transient = offloaded = 0
    eight_bit = set() if layers is None or weight_format == "keep" else \
        {lp.name for lp in layers} - {w.name for w in weights if w.head}
    if zero is not None:
        weight_bytes, grads, states, offloaded, zero_transient = zero_bytes(weights, layers, pb, zero)
    else:
        weight_bytes = sum(quant_weight_bytes(w.numel, w.in_features) if w.name in eight_bit else w.numel * pb
                           for w in weights)
        grads, states = trainable_bytes(weights, layers, pb, optimizer, coords_bytes)
    # an 8-bit weight dequantized for its matmul, straight into the compute dtype (one weight at a time)
    dequant = max((w.numel for w in weights if w.name in eight_bit), default=0) * dtype_bytes
    if layers is not None and (savings or {}).get("loss_chunk"):
        chunked_cross_entropy, ce_chunk_tokens = True, savings["loss_chunk"]
    elif chunked_cross_entropy and layers is not None:
        savings = dict(savings or {}, loss_chunk=ce_chunk_tokens)
    acts = saved_activations(shape, weights, layers, batch_size, seq_len, dtype_bytes, gradient_checkpointing, savings)
    recompute = acts.pop("_recompute", 0)
    if chunked_cross_entropy and layers is None:  # a plain model with a hand-written chunked loss
        rows = min(N, ce_chunk_tokens)
        acts["logits/loss"] = acts.get("logits/loss", 0) - N * shape.vocab * FP32 + N * FP32 + rows * shape.vocab * FP32
        live_logits = rows * shape.vocab * dtype_bytes
    elif chunked_cross_entropy:  # memwrap's chunked loss: one chunk's logits at a time, never returned
        live_logits = 0
    else:
        live_logits = logits_bytes(shape, N, dtype_bytes)  # the model output keeps the logits alive
    saved = sum(acts.values())
    # largest transient: the logits' gradient (fp32 and cast) at the start of backward, or an MLP block's
    # temporaries, or a checkpointed layer recomputed
    rows = min(N, ce_chunk_tokens) if chunked_cross_entropy else N
    # (memwrap's chunked loss holds a chunk's fp32 logits, their softmax and its cast gradient in backward)
    per_row = (2 * FP32 + dtype_bytes) if chunked_cross_entropy and layers is not None else (FP32 + dtype_bytes)
    transient = max(rows * shape.vocab * per_row,
                    N * max(shape.intermediate, shape.moe_intermediate * max(shape.top_k, 1)) * dtype_bytes * 2,
                    recompute, dequant) + zero_transient
    forward_peak = weight_bytes + states + saved + live_logits + transient
    # the step's transient: the exact weights' optimizer temporaries (memwrap.optimizer: a wave of them at a time;
    # plain AdamW's single-tensor path holds two temporaries of the weight), or one wave of the grouped merge
    plan = _layer_settings(layers)
    exact = [w.numel for w in weights if w.name not in plan and w.trainable]
    exact_temp = max(exact, default=0) * pb * 2 if layers is None else min(MERGE_CHUNK_BYTES, sum(exact) * pb)
    # (the least a wave can be: one weight; the planner lets waves grow to fill what the step leaves of the budget)
    merge = min(MERGE_CHUNK_BYTES, max((lp.weight_numel for lp in plan.values()), default=0) * MERGE_BYTES_PER_ELEMENT)
    step_peak = weight_bytes + grads + states + max(exact_temp, merge)
    peak = max(forward_peak, step_peak)
    parts = (("weights", weight_bytes), ("gradients", grads), ("optimizer states", states),
             ("saved activations", saved), ("logits", live_logits), ("largest transient", transient))
    details = {"activations": acts, "forward_peak": forward_peak, "step_peak": step_peak}
    if zero is not None:
        details.update(zero=zero.describe(), offloaded_bytes=offloaded)
    if eight_bit:
        details.update(weight_format=weight_format, eight_bit_weights=len(eight_bit))
    return Estimate(parts=parts, peak_bytes=int(peak), saved_activation_bytes=int(saved), details=details)
