"""Soft Mixture of Adapters (Soft-MoA) beside the sub-layers of a frozen transformer: Cappellazzo, Falavigna,
Brutti, Interspeech 2024, arXiv 2402.00828; routing of Soft MoE (Puigcerver et al., ICLR 2024, arXiv 2308.00951).
Imports torch and the standard library only: copy it alone. Mixtures (SingleAdapter, DenseMoA, SoftMoA) are called
as `y, info = mixture(x, mask)`; `mixture.stats = True` adds the expert statistics of Figs. 2-3 to info.
Shapes: b batch, m tokens, d width, n experts, p slots per expert, s = n*p, r bottleneck. mask (b, m) bool,
True = real token: padded tokens reach no slot and get zero output rows (an all-padding row: all zeros).
"""
from types import MappingProxyType
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("single", "dense", "soft")
PLACEMENTS = ("pfeiffer", "houlsby", "none")
AST_BASE_TOKENS = 12 * 101 + 2  # AST-Base, 10 s: 12 x 101 patches (16x16, stride 10) + [CLS] + dist
Info = Dict[str, torch.Tensor]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _check_input(x: torch.Tensor, mask: Optional[torch.Tensor], d: int) -> None:
    if x.dim() != 3 or x.shape[2] != d or x.shape[1] < 1 or not x.is_floating_point():
        raise ValueError(f"x must be floating-point with shape (b, m >= 1, d = {d}), got {x.dtype} {tuple(x.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(f"mask must be a bool tensor of shape (b, m) = {tuple(x.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with weights below eps**2 exactly zero (their logits -inf, so their gradients too). Deviation: a numerics
    fix, as subnormals are slow on many CPUs (not torch.set_flush_denormal, which is process-global)."""
    negligible = torch.finfo(logits.dtype).eps ** 2
    with torch.no_grad():  # which weights to drop is a discrete choice; no gradient flows through it
        drop = torch.softmax(logits, dim) < negligible
    w = torch.softmax(logits.masked_fill(drop, float("-inf")), dim)  # the kept weights only grow
    return torch.where(w >= negligible, w, 0.0)  # rounding at the boundary; 0/0 of an all-padding row -> 0


def _stack_experts(experts: nn.ModuleList) -> Tuple[torch.Tensor, ...]:
    # For one einsum batched over experts; scale folded in: scale (W h + c) = (scale W) h + scale c.
    w_down = torch.stack([e.down.weight for e in experts])  # (n, r, d)
    b_down = torch.stack([e.down.bias for e in experts])  # (n, r)
    w_up = torch.stack([e.scale * e.up.weight for e in experts])  # (n, d, r)
    b_up = torch.stack([e.scale * e.up.bias for e in experts])  # (n, d)
    return w_down, b_down, w_up, b_up


class Adapter(nn.Module):
    """Bottleneck adapter scale * up(GELU(down(h))); `up` starts at zero, so a new one is a no-op.
    Deviation (from the authors' code): they zero `down` too, so only up.bias can ever learn."""

    def __init__(self, d: int, r: int, scale: float = 1.0):
        super().__init__()
        _check_sizes(d=d, r=r)
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)  # (d -> r), (r -> d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.gelu(self.down(h)))  # (..., d) -> (..., r) -> (..., d)


class SingleAdapter(nn.Module):
    """One adapter on every token, with the mixtures' `(y, info)` call (info is empty)."""

    def __init__(self, d: int, r: int, scale: float = 1.0):
        super().__init__()
        self.d = d
        self.adapter = Adapter(d, r, scale)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        y = self.adapter(x)  # (b, m, d)
        return (y if mask is None else y.masked_fill(~mask[..., None], 0.0)), {}  # padded rows zero


class DenseMoA(nn.Module):
    """Dense-MoA: g_t = softmax(router(x_t)) over n; y_t = sum_i g_ti adapter_i(x_t). Deviation: the router has a
    bias (nn.Linear's default; the paper does not say). info: router_probs (b, m, n); with stats, expert_usage
    (= router_probs), expert_contribution (norm of each adapter's weighted output): (b, m, n), detached, 0 at pads."""

    def __init__(self, d: int, n_experts: int, r: int):
        super().__init__()
        _check_sizes(d=d, n_experts=n_experts, r=r)
        self.d, self.n_experts, self.stats = d, n_experts, False
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(Adapter(d, r) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        x = x if mask is None else x.masked_fill(~mask[..., None], 0.0)  # padded rows may even be NaN
        rdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # router in >= fp32 (fp64 for tests)
        with torch.autocast(x.device.type, enabled=False):  # even under autocast: bf16 loses small weights
            logits = F.linear(x.to(rdt), self.router.weight.to(rdt), self.router.bias.to(rdt))  # (b, m, n)
            probs = _softmax(logits, dim=-1)  # (b, m, n)
        probs = probs if mask is None else probs.masked_fill(~mask[..., None], 0.0)  # padding: no output
        w_down, b_down, w_up, b_up = _stack_experts(self.experts)
        h = F.gelu(torch.einsum("bmd,nrd->bmnr", x, w_down) + b_down)  # (b, m, n, r)
        # h weighted before the up-projection: the sum over adapters is one (b m, n r) @ (n r, d) matmul.
        g = probs.to(h.dtype)
        y = torch.einsum("bmnr,ndr->bmd", h * g[..., None], w_up)  # (b, m, d)
        y = y + g.to(y.dtype) @ b_up.to(y.dtype)  # (b, m, d)
        if not self.stats:
            return y, {"router_probs": probs}
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            # ||g_i (W_i h_i + c_i)||^2 = g_i^2 (h'W'W h + 2 c'W h + c'c), never building (b, m, n, d).
            h, w_up, b_up = h.to(rdt), w_up.to(rdt), b_up.to(rdt)
            gram = torch.einsum("ndr,nds->nrs", w_up, w_up)  # (n, r, r)
            sq = torch.einsum("bmnr,nrs,bmns->bmn", h, gram, h)  # (b, m, n)
            sq = sq + 2 * torch.einsum("bmnr,nr->bmn", h, torch.einsum("nd,ndr->nr", b_up, w_up))
            sq = sq + (b_up * b_up).sum(-1)  # (b, m, n)
        return y, {"router_probs": probs, "expert_usage": probs.detach(),
                   "expert_contribution": probs.detach() * sq.clamp_min(0).sqrt()}


class SoftMoA(nn.Module):
    """Soft mixture of adapters (Soft MoE routing, Puigcerver et al. Sec. 2.1). Per sequence X (m, d), phi (d, s),
    slot j belonging to expert j // p:
        logits = X phi                                   (m, s)
        D = softmax over tokens, per slot;  Xs = D^T X   (Soft MoE Eq. 1: slots are convex mixes)
        Ys_j = adapter_{j // p}(Xs_j)                    (each adapter sees only its p slots)
        C = softmax over slots, per token;  Y = C Ys     (Soft MoE Eq. 2: outputs are convex mixes)
    normalize=True: logits = scale * l2norm_d(X) l2norm_d(phi), learnable scale (init 1); raw X is dispatched.
    Deviation (from the authors' code): normalised over d, not over the experts axis. Deviations (from the paper):
    phi ~ N(0, 1/d) (none given; vmoe's LeCun normal); padding (none there) gets -inf dispatch logits, zero combine.
    info: dispatch, combine (b, m, s) (>= fp32, in the graph); with stats, expert_usage (combine mass per expert),
    expert_contribution (norm of each expert's part of each token), (b, m, n), detached."""

    def __init__(self, d: int, n_experts: int, slots_per_expert: int, r: int, normalize: bool = False):
        super().__init__()
        _check_sizes(d=d, n_experts=n_experts, slots_per_expert=slots_per_expert, r=r)
        self.d, self.n_experts, self.slots_per_expert, self.stats = d, n_experts, slots_per_expert, False
        self.normalize = bool(normalize)
        self.phi = nn.Parameter(torch.randn(d, n_experts * slots_per_expert) * d**-0.5)  # (d, s)
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None
        self.experts = nn.ModuleList(Adapter(d, r) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
        _check_input(x, mask, self.d)
        (b, m, d), n, p = x.shape, self.n_experts, self.slots_per_expert
        x = x if mask is None else x.masked_fill(~mask[..., None], 0.0)  # padded rows may even be NaN
        rdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # routing in >= fp32, as in DenseMoA
        with torch.autocast(x.device.type, enabled=False):
            xr, phi = x.to(rdt), self.phi.to(rdt)  # (b, m, d), (d, s)
            if self.normalize:
                logits = self.scale.to(rdt) * (F.normalize(xr, dim=-1) @ F.normalize(phi, dim=0))  # (b, m, s)
            else:
                logits = xr @ phi  # (b, m, s)
            # -inf: a padded token gets exactly zero weight in every slot.
            dispatch_logits = logits if mask is None else logits.masked_fill(~mask[..., None], float("-inf"))
            dispatch = _softmax(dispatch_logits, dim=1)  # (b, m, s), over m
            combine = _softmax(logits, dim=2)  # (b, m, s), over s
            combine = combine if mask is None else combine.masked_fill(~mask[..., None], 0.0)  # zero rows
        # Eq. 1 Xs = D^T X, experts, Eq. 2 Y = C Ys: in the input (or autocast) dtype, unlike the softmaxes.
        slots_in = torch.einsum("bms,bmd->bsd", dispatch.to(x.dtype), x).reshape(b, n, p, d)  # (b, n, p, d)
        # Expert i on its own p slots only: one einsum batched over the n experts.
        w_down, b_down, w_up, b_up = _stack_experts(self.experts)
        h = F.gelu(torch.einsum("bnpd,nrd->bnpr", slots_in, w_down) + b_down[:, None])  # (b, n, p, r)
        slots_out = torch.einsum("bnpr,ndr->bnpd", h, w_up) + b_up[:, None]  # (b, n, p, d)
        y = torch.einsum("bms,bsd->bmd", combine.to(x.dtype), slots_out.reshape(b, n * p, d))  # (b, m, d)
        if not self.stats:
            return y, {"dispatch": dispatch, "combine": combine}
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            # Expert i's part of token t is sum_j C_tj Ys_j over its slots j: squared norm C_ti' G_i C_ti,
            # G_i the (p, p) Gram matrix of its slot outputs.
            c, ys = combine.detach().view(b, m, n, p), slots_out.detach().to(rdt)
            gram = torch.einsum("bnpd,bnqd->bnpq", ys, ys)  # (b, n, p, p)
            sq = torch.einsum("bmnp,bnpq,bmnq->bmn", c, gram, c)  # (b, m, n)
        return y, {"dispatch": dispatch, "combine": combine, "expert_usage": c.sum(-1),
                   "expert_contribution": sq.clamp_min(0).sqrt()}


def build_mixture(kind: str, d: int, r: int, n_experts: int = 7, slots_per_expert: int = 1,
                  normalize: bool = False) -> nn.Module:
    """A mixture of `kind`; "single" ignores n_experts and slots, "dense" the slots (paper: N 7, p 1)."""
    _check_choice("mixture kind", kind, KINDS)
    if normalize and kind != "soft":
        raise ValueError(f"normalize=True applies only to kind 'soft', got kind {kind!r}")
    return (SingleAdapter(d, r) if kind == "single" else DenseMoA(d, n_experts, r) if kind == "dense"
            else SoftMoA(d, n_experts, slots_per_expert, r, normalize))


def make_block_adapters(placement: str = "pfeiffer", kind: str = "soft", *, d: int, r: int,
                        n_experts: int = 7, slots_per_expert: int = 1, normalize: bool = False) -> nn.ModuleDict:
    """A block's mixtures (`block.adapters`) keyed by the sub-layer beside them: pfeiffer attn, houlsby attn and ffn."""
    _check_choice("placement", placement, PLACEMENTS)
    keys = {"pfeiffer": ("attn",), "houlsby": ("attn", "ffn"), "none": ()}[placement]
    return nn.ModuleDict({k: build_mixture(kind, d, r, n_experts, slots_per_expert, normalize) for k in keys})


def adapted_sublayer(x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                     sublayer: Callable[[torch.Tensor], torch.Tensor], mixture: Optional[nn.Module] = None,
                     mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Info]:
    """One pre-norm residual update (b, m, d) with an optional mixture in parallel (paper Fig. 1): h = norm(x);
    x + sublayer(h) + mixture(h). Deviation (from the authors' code): added once (they add it twice at MHSA)."""
    h = norm(x)  # (b, m, d)
    s = sublayer(h)  # (b, m, d)
    if mixture is None:
        return x + s, {}
    a, info = mixture(h, mask)  # (b, m, d)
    return x + s + a, info


def mark_trainable(model: nn.Module, extra: Iterable[str] = ("norm", "head"),
                   feeding_norms: Mapping[str, str] = MappingProxyType({"attn": "norm1", "ffn": "norm2"})
                   ) -> List[str]:
    """Freeze `model` but what the paper trains, return those parameter names sorted: every mixture, for each
    key k of a block's `adapters` the norm `feeding_norms[k]` feeding it, every parameter under `extra` paths."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (Adapter, SingleAdapter, DenseMoA, SoftMoA)):
            module.requires_grad_(True)
        adapters = getattr(module, "adapters", None)
        for key in adapters.keys() if isinstance(adapters, nn.ModuleDict) else ():
            norm = getattr(module, feeding_norms.get(key, ""), None)
            if not isinstance(norm, nn.Module):
                raise ValueError(f"block {type(module).__name__} has a mixture at {key!r} but no feeding norm; "
                                 f"expected attribute {feeding_norms.get(key)!r} (feeding_norms={{{key!r}: ...}})")
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


def macs_per_token(kind: str, d: int, r: int, n_experts: int = 7, slots_per_expert: int = 1,
                   m_tokens: int = AST_BASE_TOKENS) -> float:
    """Matmul multiply-accumulates per token of one mixture (paper Sec. 3; biases, GELU, softmax out):
    single 2dr; dense n 2dr + dn; soft 3ds + s 2dr / m (the slots' work shared by m tokens)."""
    _check_choice("mixture kind", kind, KINDS)
    _check_sizes(d=d, r=r, n_experts=n_experts, slots_per_expert=slots_per_expert, m_tokens=m_tokens)
    s = n_experts * slots_per_expert
    return {"single": 2.0 * d * r, "dense": n_experts * 2.0 * d * r + d * n_experts,
            "soft": 3 * d * s + s * 2 * d * r / m_tokens}[kind]

