"""
Soft Mixture of Adapters (Soft-MoA) for parameter-efficient fine-tuning of a frozen transformer.

    Cappellazzo, Falavigna, Brutti, "Efficient Fine-tuning of Audio Spectrogram Transformers via
    Soft Mixture of Adapters", Interspeech 2024, arXiv 2402.00828.
    Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts",
    ICLR 2024, arXiv 2308.00951 (Soft MoE, the routing used here).

Three interchangeable "mixtures", each called as `y, info = mixture(x, mask)`:
    single : one bottleneck adapter on every token                     (SingleAdapter)
    dense  : n adapters on every token, mixed by a per-token softmax     (DenseMoA)
    soft   : Soft MoE routing: n*p slots, each a convex mix of tokens,   (SoftMoA)
             each adapter runs only on its own p slots, every token takes a convex mix of slots
plus the block wiring (parallel / sequential, Pfeiffer / Houlsby), the freezing rule of the paper,
cost accounting (parameters, MACs per token) and the expert statistics of the paper's Figs. 2-3.

Notation (shapes in comments use these symbols):
    b  batch size               m  tokens per sequence (padding included)
    d  model width              n  number of experts (adapters)
    p  slots per expert         r  adapter bottleneck width
    s  = n*p, total slots

Padding: `mask` is a (b, m) bool tensor, True = real token. Padded tokens never reach a slot and
their output rows are exactly zero, so a padded token's values cannot change any real token's output.

Imports torch and the standard library only, so this file can be copied on its own.
"""

from types import MappingProxyType
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("single", "dense", "soft")
PLACEMENTS = ("pfeiffer", "houlsby", "none")
SUBLAYERS = ("attn", "ffn")
MODES = ("parallel", "sequential")

# AST-Base on 10 s of audio: 1024 frames x 128 mel bins cut into 16x16 patches at stride 10
# gives (128 - 16) // 10 + 1 = 12 frequency x (1024 - 16) // 10 + 1 = 101 time patches = 1212,
# plus the [CLS] and distillation tokens. This is the m over which Soft-MoA amortises expert work.
AST_BASE_TOKENS = 12 * 101 + 2  # 1214

Info = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Checks and numerics shared by the mixtures

def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _check_input(x: torch.Tensor, mask: Optional[torch.Tensor], d: int) -> None:
    if not torch.is_tensor(x):
        raise ValueError(f"x must be a tensor of shape (b, m, d) with d = {d}, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have rank 3, shape (b, m, d) with d = {d}; got rank {x.dim()}, "
                         f"shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    b, m, width = x.shape
    if width != d:
        raise ValueError(f"x has width {width} in its last dimension, expected d = {d}")
    if m < 1:
        raise ValueError("x has no tokens (m = 0); expected at least one token per sequence")
    if mask is None:
        return
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = real token), got {got}")
    if tuple(mask.shape) != (b, m):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (b, m) = {(b, m)}")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequence(s) {empty} are all padding; each needs at least one real token")


def _router_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax weights in at least float32 (bf16 logits over ~1200 tokens lose the small weights);
    # float64 inputs stay float64 so the module can be checked against float64 references.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with negligible weights set to exactly zero, so no weight or gradient is subnormal.

    A softmax over hundreds of tokens with large logits leaves many weights subnormal
    (0 < w < finfo.tiny), and on many CPUs fp32 arithmetic on subnormal operands is an order of
    magnitude slower. Weights below eps**2 (1.4e-14 in fp32) are dropped: their logits are set to
    -inf before the softmax, so they are exactly zero in the forward pass and get exactly zero
    gradient. (A flush applied only after the softmax would leave subnormals in its backward,
    w * (g - <w, g>); with w >= eps**2 that product is subnormal only if |g - <w, g>| < 1e-24.)
    The dropped mass is < m * eps**2, far below the rounding error of the result for any m << 1/eps.
    Deviation: not in either paper; a numerics fix, done here rather than with the process-global
    torch.set_flush_denormal so this module has no side effects on its caller.
    """
    negligible = torch.finfo(logits.dtype).eps ** 2
    with torch.no_grad():  # which weights to drop is a discrete choice; no gradient flows through it
        drop = torch.softmax(logits, dim) < negligible  # same shape as logits
    w = torch.softmax(logits.masked_fill(drop, float("-inf")), dim)  # the kept weights only grow
    return torch.where(w < negligible, 0.0, w)  # rounding at the boundary


def _stack_experts(experts: nn.ModuleList) -> Tuple[torch.Tensor, ...]:
    # One batched einsum over experts instead of a Python loop; each adapter's `scale` is folded
    # into its up-projection: scale * (W h + c) = (scale W) h + scale c.
    w_down = torch.stack([e.down.weight for e in experts])  # (n, r, d)
    b_down = torch.stack([e.down.bias for e in experts])  # (n, r)
    w_up = torch.stack([e.scale * e.up.weight for e in experts])  # (n, d, r)
    b_up = torch.stack([e.scale * e.up.bias for e in experts])  # (n, d)
    return w_down, b_down, w_up, b_up


# ----------------------------------------------------------------------------------------------
# The expert: a bottleneck adapter

class Adapter(nn.Module):
    """Bottleneck adapter: scale * up(GELU(down(h))), on rows of width d (any leading shape).

    `up` (weight and bias) starts at zero, so a freshly inserted adapter outputs exactly zero and
    the frozen model is unchanged at step 0. `down` keeps nn.Linear's default init: if it were zero
    too, the gradient of `up.weight` (proportional to GELU(down(h))) and of `down` (proportional to
    up.weight) would both stay zero forever and the adapter could only ever learn up.bias.
    Deviation (from the authors' code, not the paper): their public code zero-initialises both
    projections, which is exactly that trap; we follow the paper (zero up-projection only).
    """

    def __init__(self, d: int, r: int, scale: float = 1.0):
        super().__init__()
        _check_sizes(d=d, r=r)
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.gelu(self.down(h)))  # (..., r) -> (..., d)


class SingleAdapter(nn.Module):
    """One adapter on every token, with the mixtures' `(y, info)` call convention (info is empty)."""

    def __init__(self, d: int, r: int, scale: float = 1.0):
        super().__init__()
        self.d = d
        self.adapter = Adapter(d, r, scale)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        y = self.adapter(x)  # (b, m, d)
        if mask is not None:
            y = y.masked_fill(~mask[..., None], 0.0)  # padded rows are zero, like the mixtures
        return y, {}


# ----------------------------------------------------------------------------------------------
# Dense-MoA: every adapter on every token, mixed by a per-token softmax router

class DenseMoA(nn.Module):
    """Dense mixture of adapters (the paper's Dense-MoA baseline).

    router = Linear(d -> n); g = softmax over the n adapters for each token;
    y_t = sum_i g_ti * adapter_i(x_t). Cost per token: n * 2dr + dn MACs.
    Deviation: the router has a bias (nn.Linear default; not specified by the paper), so this has
    n more parameters than a Soft-MoA of the same n.

    info: router_probs (b, m, n), expert_usage (b, m, n) (= router_probs, detached),
          expert_contribution (b, m, n) (l2 norm of each adapter's weighted output, detached).
    All three are zero on padded tokens.
    """

    def __init__(self, d: int, n_experts: int, r: int):
        super().__init__()
        _check_sizes(d=d, n_experts=n_experts, r=r)
        self.d, self.n_experts = d, n_experts
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(Adapter(d, r) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # padded rows may hold anything, even NaN
        rdt = _router_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # router in >= fp32 even under autocast
            logits = F.linear(x.to(rdt), self.router.weight.to(rdt), self.router.bias.to(rdt))  # (b, m, n)
            probs = _softmax(logits, dim=-1)  # (b, m, n)
        if mask is not None:
            probs = probs.masked_fill(~mask[..., None], 0.0)  # padded tokens get no output
        w_down, b_down, w_up, b_up = _stack_experts(self.experts)
        h = F.gelu(torch.einsum("bmd,nrd->bmnr", x, w_down) + b_down)  # (b, m, n, r)
        # Weight the bottleneck activations before the up-projection, so the sum over adapters and
        # the up-projection are one (b*m, n*r) @ (n*r, d) matmul and (b, m, n, d) is never built.
        g = probs.to(h.dtype)
        y = torch.einsum("bmnr,ndr->bmd", h * g[..., None], w_up)  # (b, m, d)
        y = y + g.to(y.dtype) @ b_up.to(y.dtype)  # (b, m, d)
        info = {"router_probs": probs, "expert_usage": probs.detach()}
        info["expert_contribution"] = _dense_contribution(h, probs, w_up, b_up)  # (b, m, n)
        return y, info


def _dense_contribution(h, probs, w_up, b_up) -> torch.Tensor:
    # ||g_i (W_i h_i + c_i)|| per token and adapter, via the (n, r, r) Gram matrices of the
    # up-projections: ||W h + c||^2 = h'W'W h + 2 c'W h + c'c. Avoids a (b, m, n, d) tensor.
    rdt = probs.dtype
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        h, w_up, b_up = h.to(rdt), w_up.to(rdt), b_up.to(rdt)
        gram = torch.einsum("ndr,nds->nrs", w_up, w_up)  # (n, r, r)
        sq = torch.einsum("bmnr,nrs,bmns->bmn", h, gram, h)  # (b, m, n)
        sq = sq + 2 * torch.einsum("bmnr,nr->bmn", h, torch.einsum("nd,ndr->nr", b_up, w_up))
        sq = sq + (b_up * b_up).sum(-1)  # (b, m, n)
        return probs.detach() * sq.clamp_min(0).sqrt()  # (b, m, n)


# ----------------------------------------------------------------------------------------------
# Soft-MoA: Soft MoE routing over adapters

class SoftMoA(nn.Module):
    """Soft mixture of adapters (Soft MoE routing, Puigcerver et al. Sec. 2.1).

    Per sequence X (m, d) and parameters phi (d, n*p), slot j belonging to expert j // p:
        logits = X phi                                   (m, n*p)
        D = softmax over tokens, per slot;  Xs = D^T X   (Soft MoE Eq. 1: slots are convex mixes)
        Ys_j = adapter_{j // p}(Xs_j)                    (each adapter sees only its p slots)
        C = softmax over slots, per token;  Y = C Ys     (Soft MoE Eq. 2: outputs are convex mixes)
    Cost per token: 3 d n p MACs (logits, dispatch, combine) + n p 2 d r / m for the experts.

    normalize=True: logits = scale * l2norm_d(X) l2norm_d(phi), with a learnable scalar `scale`
    (init 1), as in Soft MoE's normalisation; it only shapes the logits, the raw X is dispatched.
    Deviation (from the authors' code): their code normalises phi over the experts axis instead of
    the feature axis d; we follow the Soft MoE paper (over d).

    phi is initialised N(0, 1/d) (LeCun normal with fan-in d, like vmoe's SoftRouter), so logits
    start O(|x|/sqrt(d) * sqrt(d)) = O(rms of x); the paper does not give an init.

    Padding (Deviation: the paper has no padding): padded tokens get -inf logits in the dispatch
    softmax (exactly zero weight in every slot) and a zero combine row (exactly zero output).

    info: dispatch (b, m, n*p), combine (b, m, n*p) (both in >= fp32, attached to the graph),
          expert_usage (b, m, n) = combine mass per expert, expert_contribution (b, m, n) = l2 norm
          of each expert's part of each output token (both detached). Zero on padded tokens.
    """

    def __init__(self, d: int, n_experts: int, slots_per_expert: int, r: int, normalize: bool = False):
        super().__init__()
        _check_sizes(d=d, n_experts=n_experts, slots_per_expert=slots_per_expert, r=r)
        self.d, self.n_experts, self.slots_per_expert = d, n_experts, slots_per_expert
        self.normalize = bool(normalize)
        self.phi = nn.Parameter(torch.randn(d, n_experts * slots_per_expert) * d**-0.5)  # (d, n*p)
        if self.normalize:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_parameter("scale", None)
        self.experts = nn.ModuleList(Adapter(d, r) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        b, m, d = x.shape
        n, p = self.n_experts, self.slots_per_expert
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # padded rows may hold anything, even NaN
        dispatch, combine = self._routing(x, mask)  # (b, m, n*p) each
        cdt = x.dtype  # matmuls run in the input (or autocast) dtype, softmaxes did not
        slots_in = torch.einsum("bms,bmd->bsd", dispatch.to(cdt), x)  # (b, n*p, d)  Eq. 1
        slots_out = self._experts(slots_in.reshape(b, n, p, d))  # (b, n, p, d)
        y = torch.einsum("bms,bsd->bmd", combine.to(cdt), slots_out.reshape(b, n * p, d))  # (b, m, d)  Eq. 2
        info = {"dispatch": dispatch, "combine": combine}
        info.update(_soft_statistics(combine.view(b, m, n, p), slots_out))
        return y, info

    def _routing(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        rdt = _router_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # logits and softmaxes in >= fp32
            xr, phi = x.to(rdt), self.phi.to(rdt)  # (b, m, d), (d, n*p)
            if self.normalize:
                xr, phi = F.normalize(xr, dim=-1), F.normalize(phi, dim=0)
            logits = xr @ phi  # (b, m, n*p)
            if self.normalize:
                logits = self.scale.to(rdt) * logits
            if mask is not None:
                # A padded token must not enter any slot: -inf gives it exactly zero dispatch weight.
                dispatch_logits = logits.masked_fill(~mask[..., None], float("-inf"))
            else:
                dispatch_logits = logits
            dispatch = _softmax(dispatch_logits, dim=1)  # (b, m, n*p), over m
            combine = _softmax(logits, dim=2)  # (b, m, n*p), over n*p
            if mask is not None:
                combine = combine.masked_fill(~mask[..., None], 0.0)  # padded output rows are zero
        return dispatch, combine

    def _experts(self, xs: torch.Tensor) -> torch.Tensor:
        # Expert i runs on its own p slots only: one einsum batched over the n experts.
        w_down, b_down, w_up, b_up = _stack_experts(self.experts)
        h = F.gelu(torch.einsum("bnpd,nrd->bnpr", xs, w_down) + b_down[:, None])  # (b, n, p, r)
        return torch.einsum("bnpr,ndr->bnpd", h, w_up) + b_up[:, None]  # (b, n, p, d)


def _soft_statistics(combine: torch.Tensor, slots_out: torch.Tensor) -> Info:
    # combine (b, m, n, p), slots_out (b, n, p, d). Expert i's part of output token t is
    # sum_{j in i's slots} C_tj Ys_j; its squared norm is C_t,i' G_i C_t,i with G_i the (p, p)
    # Gram matrix of i's slot outputs, so (b, m, n, d) is never built.
    rdt = combine.dtype
    with torch.no_grad(), torch.autocast(combine.device.type, enabled=False):
        c, ys = combine.detach(), slots_out.detach().to(rdt)
        gram = torch.einsum("bnpd,bnqd->bnpq", ys, ys)  # (b, n, p, p)
        sq = torch.einsum("bmnp,bnpq,bmnq->bmn", c, gram, c)  # (b, m, n)
        return {"expert_usage": c.sum(-1), "expert_contribution": sq.clamp_min(0).sqrt()}  # (b, m, n)


# ----------------------------------------------------------------------------------------------
# Factory and placement in a pre-norm transformer block

MIXTURE_TYPES = (Adapter, SingleAdapter, DenseMoA, SoftMoA)


def build_mixture(kind: str, d: int, r: int, n_experts: int = 7, slots_per_expert: int = 1,
                  normalize: bool = False) -> nn.Module:
    """A mixture with the uniform `y, info = mixture(x, mask)` call.

    kind "single" ignores n_experts and slots_per_expert; "dense" ignores slots_per_expert.
    normalize applies to "soft" only and is rejected elsewhere rather than silently dropped.
    Defaults N = 7, p = 1 are the paper's.
    """
    _check_choice("mixture kind", kind, KINDS)
    if normalize and kind != "soft":
        raise ValueError(f"normalize=True applies only to kind 'soft', got kind {kind!r}")
    if kind == "single":
        return SingleAdapter(d, r)
    if kind == "dense":
        return DenseMoA(d, n_experts, r)
    return SoftMoA(d, n_experts, slots_per_expert, r, normalize)


def make_block_adapters(placement: str = "pfeiffer", kind: str = "soft", *, d: int, r: int,
                        n_experts: int = 7, slots_per_expert: int = 1, normalize: bool = False,
                        pfeiffer_at: str = "attn") -> nn.ModuleDict:
    """The mixtures one transformer block owns, keyed by the sub-layer they sit next to.

    pfeiffer: one mixture, next to MHSA ("attn", the paper's default) or the FFN ("ffn").
    houlsby : two mixtures, next to MHSA and next to the FFN.
    none    : no mixture (empty dict; the block is the frozen one).
    A block stores this as `self.adapters` and passes `adapters[k] if k in adapters else None`
    to `adapted_sublayer` for k in ("attn", "ffn"); `mark_trainable` relies on that attribute name.
    """
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("pfeiffer_at sub-layer", pfeiffer_at, SUBLAYERS)
    keys = {"pfeiffer": (pfeiffer_at,), "houlsby": SUBLAYERS, "none": ()}[placement]
    return nn.ModuleDict({k: build_mixture(kind, d, r, n_experts, slots_per_expert, normalize) for k in keys})


def adapted_sublayer(x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                     sublayer: Callable[[torch.Tensor], torch.Tensor], mixture: Optional[nn.Module] = None,
                     mask: Optional[torch.Tensor] = None, mode: str = "parallel") -> Tuple[torch.Tensor, Info]:
    """One pre-norm residual update, with an optional mixture beside it (paper Fig. 1).

    parallel   (the paper): h = norm(x); x + sublayer(h) + mixture(h). The mixture reads the same
               LayerNorm output as the sub-layer it sits beside, so it adapts what that frozen
               sub-layer computes without changing its input; its output is added once.
               Deviation (from the authors' code): with Pfeiffer-at-MHSA their code adds the
               mixture output to the residual twice; here it is added exactly once.
    sequential (option): s = sublayer(norm(x)); x + s + mixture(s), the adapter-on-the-output
               form of Houlsby et al., with the adapter's own skip folded into the residual sum.
    mixture None: the plain pre-norm update x + sublayer(norm(x)), info = {}.

    `sublayer` maps (b, m, d) -> (b, m, d); attention closes over its own padding mask, e.g.
    `lambda h: attn(h, mask)`. Returns (x_out (b, m, d), the mixture's info).
    """
    _check_choice("mode", mode, MODES)
    h = norm(x)  # (b, m, d)
    s = sublayer(h)  # (b, m, d)
    if mixture is None:
        return x + s, {}
    a, info = mixture(h if mode == "parallel" else s, mask)  # (b, m, d)
    return x + s + a, info


# ----------------------------------------------------------------------------------------------
# What the paper trains

DEFAULT_FEEDING_NORMS = MappingProxyType({"attn": "norm1", "ffn": "norm2"})


def mark_trainable(model: nn.Module, extra: Iterable[str] = ("norm", "head"),
                   feeding_norms: Mapping[str, str] = DEFAULT_FEEDING_NORMS,
                   adapters_attr: str = "adapters") -> List[str]:
    """Freeze `model`, then unfreeze what the paper trains; return the trainable parameter names.

    Unfrozen:
      1. every Adapter / SingleAdapter / DenseMoA / SoftMoA module, found by type wherever it is;
      2. the LayerNorm that feeds each mixture (in sequential mode: the one feeding the sub-layer
         the mixture follows): any module holding an `adapters_attr` ModuleDict (see
         make_block_adapters) has, for each key k in it, its norm `feeding_norms[k]` unfrozen
         (default: "attn" -> norm1, "ffn" -> norm2, the timm/ViT names); a missing norm is an error;
      3. every parameter named `e` or under `e.` for each module path e in `extra` (default: the
         final norm "norm" and the task head "head"); a path matching nothing is an error.
    Nothing else of the encoder's naming is assumed; pass other names for other encoders.
    """
    for prm in model.parameters():
        prm.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MIXTURE_TYPES):
            module.requires_grad_(True)
        adapters = getattr(module, adapters_attr, None)
        if isinstance(adapters, nn.ModuleDict):
            for key in adapters.keys():
                norm = getattr(module, feeding_norms[key], None) if key in feeding_norms else None
                if not isinstance(norm, nn.Module):
                    raise ValueError(f"block {type(module).__name__} has a mixture at {key!r} but no "
                                     f"feeding norm; expected attribute {feeding_norms.get(key)!r} "
                                     f"(set feeding_norms={{{key!r}: '<name>'}})")
                norm.requires_grad_(True)
    named = dict(model.named_parameters())
    for path in extra:
        hits = [k for k in named if k == path or k.startswith(path + ".")]
        if not hits:
            raise ValueError(f"extra module path {path!r} matches no parameter of the model; "
                             f"expected a prefix such as one of {sorted({k.split('.')[0] for k in named})}")
        for k in hits:
            named[k].requires_grad_(True)
    return sorted(k for k, prm in named.items() if prm.requires_grad)


# ----------------------------------------------------------------------------------------------
# Cost accounting (paper Sec. 3: same parameters, different compute)

def count_params(module: nn.Module) -> int:
    """Number of trainable (requires_grad) parameters: a whole mixture, or a model after mark_trainable."""
    return sum(prm.numel() for prm in module.parameters() if prm.requires_grad)


def macs_per_token(kind: str, d: int, r: int, n_experts: int = 7, slots_per_expert: int = 1,
                   m_tokens: int = AST_BASE_TOKENS) -> float:
    """Multiply-accumulates per token of one mixture (matmuls only; biases, GELU, softmax ignored).

    single: 2dr.  dense: n * 2dr + dn (router).
    soft  : d n p (logits) + d n p (dispatch D^T X) + d n p (combine C Ys) + n p 2dr / m, the
            expert work on the n*p slots shared by the m tokens of a sequence (default m: AST-Base,
            10 s of audio, 1214 tokens).
    """
    _check_choice("mixture kind", kind, KINDS)
    _check_sizes(d=d, r=r, n_experts=n_experts, slots_per_expert=slots_per_expert, m_tokens=m_tokens)
    adapter = 2 * d * r
    if kind == "single":
        return float(adapter)
    if kind == "dense":
        return float(n_experts * adapter + d * n_experts)
    s = n_experts * slots_per_expert
    return 3 * d * s + s * adapter / m_tokens


def cost_table(d: int = 768, r: int = 6, n_experts: int = 7, slots_per_expert: int = 1,
               m_tokens: int = AST_BASE_TOKENS) -> str:
    """Markdown table of trainable parameters and MACs per token per mixture (paper settings by default)."""
    names = {"single": "single adapter", "dense": f"Dense-MoA (N={n_experts})",
             "soft": f"Soft-MoA (N={n_experts}, p={slots_per_expert}, m={m_tokens})"}
    rows = ["| mixture | trainable params | MACs / token | MACs vs single |", "|---|---:|---:|---:|"]
    base = macs_per_token("single", d, r)
    for kind in KINDS:
        with torch.device("meta"):  # counts the real modules' parameters without allocating them
            params = count_params(build_mixture(kind, d, r, n_experts, slots_per_expert))
        macs = macs_per_token(kind, d, r, n_experts, slots_per_expert, m_tokens)
        rows.append(f"| {names[kind]} | {params:,} | {macs:,.0f} ({macs / 1e3:.1f}k) | {macs / base:.2f}x |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Expert statistics (paper Fig. 2 right: contributions; Fig. 3: usage per class)

def usage_per_sequence(usage: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, m, n) per-token usage -> (b, n) mean over each sequence's real tokens.

    Real tokens are `mask` if given, else the rows whose usage is nonzero (the mixtures' usage
    rows sum to 1 on real tokens and are all zero on padded ones). Use this per batch and
    concatenate, to keep a whole data set's statistics small.
    """
    if usage.dim() != 3:
        raise ValueError(f"usage must have shape (b, m, n), got {tuple(usage.shape)}")
    real = mask if mask is not None else usage.sum(-1) > 0  # (b, m)
    real = real.to(usage.dtype)[..., None]  # (b, m, 1)
    return (usage * real).sum(1) / real.sum(1).clamp_min(1)  # (b, n)


def expert_usage_by_class(usage: torch.Tensor, labels: torch.Tensor, n_classes: int,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean expert usage per class, (n_classes, n), for a heat map like the paper's Fig. 3.

    usage: info["expert_usage"] (b, m, n) (Soft-MoA: combine mass per expert; Dense-MoA: router
    probability), or per-sequence usage (b, n) from `usage_per_sequence`. labels: (b,) class ids.
    Each sequence counts once; classes with no sequence get NaN rows (no data, not zero usage).
    """
    if usage.dim() == 3:
        usage = usage_per_sequence(usage, mask)  # (b, n)
    if usage.dim() != 2:
        raise ValueError(f"usage must have shape (b, m, n) or (b, n), got {tuple(usage.shape)}")
    _check_sizes(n_classes=n_classes)
    if labels.shape != usage.shape[:1] or labels.is_floating_point():
        raise ValueError(f"labels must be integer class ids of shape ({usage.shape[0]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    onehot = F.one_hot(labels.long(), n_classes).to(usage.dtype)  # (b, n_classes)
    return (onehot.T @ usage) / onehot.sum(0)[:, None]  # (n_classes, n); 0/0 = NaN for empty classes
