"""MoE-Adapter: a sparse mixture-of-experts bridge from an audio encoder to a decoder LLM.

Lei, He et al., "MoE Adapter for Large Audio Language Models: Sparsity, Disentanglement, and
Gradient-Conflict-Free", arXiv 2601.02967 (ACL 2026 Findings). The adapter sits between the audio
encoder and the LLM's input embeddings:

    encoder frames (B, T, d_in) --stack--> tokens (B, T', S*d_in) --LN--> h
    y = LN( sum_{e in top-k(h)} g_e(h) * E_e(h)  +  sum_s Shared_s(h) )      (B, T', d_out)

Every token is routed to its top-k routed experts; shared experts see every token. A hand-written
load-balancing loss (Switch Transformer, Fedus et al. 2021) keeps the routed experts busy.

This file imports only torch and the standard library: copy it alone into your project.

Notation (shape comments use these):
    B batch, T encoder frames, S = stack (frames per token), T' = ceil(T / S) tokens,
    D = S * d_in (token width), O = d_out (LLM width), E routed experts, k = top_k,
    N real (non-padding) tokens in the batch, H expert hidden width.

Equations, as numbered in this file (the paper's own numbering is not available to us):
    (1) p = softmax(W_g h)                          router probabilities over all E experts
    (2) g_e = p_e / sum_{j in top-k} p_j, e in top-k  gates: softmax restricted to the top-k logits
    (3) y = LN(sum_e g_e E_e(h) + Shared(h))         E_e(h) = W2 SiLU(W1 h + b1) + b2
    (4) L_bal = E * sum_e f_e P_e                    f_e: share of token-slots sent to e,
                                                     P_e: mean of p_e over real tokens
    (5) L_z = mean_n (logsumexp_e logits_ne)^2       ST-MoE router z-loss (Zoph et al. 2022)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("softmax", "sigmoid", "position")
ADAPTER_KINDS = ("moe", "moe-random", "dense-params", "dense-flops")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class MoEAdapterConfig:
    d_in: int = 64                 # audio-encoder width (per frame)
    d_out: int = 128               # LLM width
    stack: int = 4                 # frames concatenated per token: Whisper's 50 Hz -> 12.5 Hz
    n_experts: int = 8             # routed experts E (0 allowed: shared experts only)
    top_k: int = 2                 # experts per token k
    d_expert: int = 64             # hidden width H of each routed expert
    n_shared: int = 1              # shared (always-on) experts (0 allowed)
    d_shared: int = 256            # hidden width of each shared expert
    router: str = "softmax"        # "softmax" (the paper's) | "sigmoid" (DeepSeek-V3) | "position" (fixed, see _position_route)
    normalize_topk: bool = True    # renormalise the k gates to sum to 1 (the paper's Eq. 2)
    # Deviation: the paper does not publish the balance-loss weight; 1e-2 is Switch's default.
    balance_weight: float = 1e-2
    z_weight: float = 0.0          # ST-MoE router z-loss weight; the paper uses none
    jitter: float = 0.0            # training-only multiplicative noise on the router input
    capacity_factor: Optional[float] = None  # None = dropless (the paper's); see _dispatch
    norm_in: bool = True           # LayerNorm on the stacked token (the paper's)
    norm_out: bool = True          # LayerNorm on the adapter output (the paper's)

    def __post_init__(self):
        for name in ("d_in", "d_out", "stack"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEAdapterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_experts < 0 or self.n_shared < 0:
            raise ValueError(f"n_experts and n_shared must be >= 0, got {self.n_experts}, {self.n_shared}")
        if self.n_experts + self.n_shared == 0:
            raise ValueError("the adapter needs at least one expert: n_experts + n_shared is 0")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.n_experts == 0 and self.top_k != 0:
            raise ValueError(f"top_k must be 0 when n_experts is 0, got {self.top_k}")
        if self.n_experts > 0 and self.d_expert < 1:
            raise ValueError(f"d_expert must be >= 1, got {self.d_expert}")
        if self.n_shared > 0 and self.d_shared < 1:
            raise ValueError(f"d_shared must be >= 1, got {self.d_shared}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; allowed: {', '.join(ROUTERS)}")
        if self.balance_weight < 0 or self.z_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got balance_weight={self.balance_weight}, "
                             f"z_weight={self.z_weight}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")

    @property
    def d_token(self) -> int:
        """Width D of a stacked token, what the norm, router and experts see."""
        return self.stack * self.d_in

    @classmethod
    def paper(cls, **overrides) -> "MoEAdapterConfig":
        """The paper's adapter (Table 4): ~94.4M parameters, ~70.8M active per token.

        The paper's fused front-end hands the adapter 2560-wide tokens at 12.5 Hz, so the preset
        takes them as they come (d_in 2560, stack 1). 'Shared experts' is read as ONE shared expert
        of hidden 10240 mapping 2560 -> 2048 beside the 8 routed ones: the paper publishes no count,
        and this is the reading that reproduces its published totals exactly (see tests).
        """
        cfg = dict(d_in=2560, d_out=2048, stack=1, n_experts=8, top_k=4, d_expert=1280,
                   n_shared=1, d_shared=10240, router="softmax")
        return cls(**{**cfg, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "MoEAdapterConfig":
        """A CPU-sized adapter: 64-wide frames stacked 4x, 8 experts top-2, one shared expert."""
        return cls(**overrides)


# ----------------------------------------------------------------------------------------------
# Parts


class Expert(nn.Module):
    """Linear(D -> H) -> SiLU -> Linear(H -> O): one routed or shared expert."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, O)
        return self.fc2(F.silu(self.fc1(h)))


def stack_frames(x: torch.Tensor, mask: Optional[torch.Tensor], stack: int):
    """Concatenate `stack` consecutive frames into one token: (B, T, d) -> (B, T', stack*d).

    Trailing frames that do not fill a stack are zero-padded. Padding frames (mask False) are
    zeroed first, so a padded batch gives every item exactly what it gets alone. A token is real
    when any of its frames is real. Returns (tokens, token_mask or None).
    """
    B, T, d = x.shape
    T_tok = -(-T // stack)                                   # ceil(T / S)
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)               # garbage in padding never leaks in
    pad = T_tok * stack - T
    if pad:
        x = F.pad(x, (0, 0, 0, pad))                         # (B, T'*S, d)
    tokens = x.reshape(B, T_tok, stack * d)                  # (B, T', D)
    if mask is None:
        return tokens, None
    if pad:
        mask = F.pad(mask, (0, pad), value=False)
    return tokens, mask.reshape(B, T_tok, stack).any(-1)    # (B, T')


def check_input(x: torch.Tensor, mask: Optional[torch.Tensor], d_in: int) -> None:
    """ValueError naming the problem for a wrong input rank, width, or mask."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (B, T, d_in={d_in}), got shape {shape}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x width must be d_in={d_in}, got x of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor (True = real frame), got {got}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Eq. 4, L_bal = E * sum_e f_e * P_e over the real tokens of ONE adapter call.

    probs: (N, E) router probabilities over ALL experts (full softmax, not the renormalised
    top-k gates); expert_index: (N, k) the experts each token was sent to.
    f_e = (number of token-slots sent to e) / (N * k), P_e = mean_n probs[n, e].
    Scale: 1.0 means perfectly balanced (f = P = 1/E) and E is the worst case (all on one expert).
    Hugging Face's Mixtral/Qwen-MoE convention divides f by N instead of N*k and so reads k when
    balanced. f is a hard count and carries no gradient; the router learns through P.
    """
    N, E = probs.shape
    if N == 0:
        return probs.sum() * 0.0                                        # no real tokens: no loss
    counts = torch.bincount(expert_index.reshape(-1), minlength=E)      # (E,)
    f = counts.to(probs.dtype) / expert_index.numel()                   # (E,) sums to 1
    P = probs.mean(0)                                                   # (E,) sums to 1
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5, ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# The MoE-Adapter


class MoEAdapter(nn.Module):
    """Sparse MoE adapter: `y, aux = adapter(x, mask)`.

    x: (B, T, d_in) encoder frames; mask: (B, T) bool, True = real frame, or None.
    y: (B, T', d_out), zero at padding tokens. aux: dict with
        loss          balance_weight * balance_loss + z_weight * z_loss (add it to the task loss)
        balance_loss  Eq. 4 over this call's real tokens (1.0 = balanced)
        z_loss        Eq. 5
        expert_load   (E,) share of the real tokens' routed slots each expert was chosen for
                      (f_e of Eq. 4, no gradient)
        router_prob   (E,) mean router probability P_e of Eq. 4 (differentiable): with
                      expert_load and the token count it lets a data-parallel job form Eq. 4
                      over the global batch (see train.balance_loss)
        dropped       share of routed slots dropped by the capacity limit (0 when dropless)
        expert_index  (B, T', k) chosen experts, -1 at padding tokens
        expert_weight (B, T', k) gate actually applied: 0 at padding and for dropped slots
        mask          (B, T') bool, real tokens
    """

    def __init__(self, cfg: MoEAdapterConfig):
        super().__init__()
        self.cfg = cfg
        D, O = cfg.d_token, cfg.d_out
        self.norm_in = nn.LayerNorm(D) if cfg.norm_in else nn.Identity()
        # The router is a plain bias-free linear map W_g (Eq. 1), evaluated in float32 (see _route).
        self.router = nn.Linear(D, cfg.n_experts, bias=False) if cfg.n_experts and cfg.router != "position" else None
        self.experts = nn.ModuleList(Expert(D, cfg.d_expert, O) for _ in range(cfg.n_experts))
        # n shared experts of width H_s sum to ONE MLP of width n*H_s (concatenated hidden units,
        # their output biases merged): same function, one matmul instead of n.
        self.shared = Expert(D, cfg.n_shared * cfg.d_shared, O) if cfg.n_shared else None
        self.norm_out = nn.LayerNorm(O) if cfg.norm_out else nn.Identity()

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, h: torch.Tensor):
        """Router logits, full probabilities (for the loss) and top-k gates, for h: (N, D)."""
        cfg = self.cfg
        # Routing decisions are precision-sensitive (near-ties flip experts), so the router runs in
        # float32 even under bf16 autocast; float64 inputs stay float64 (exact tests).
        dtype = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.to(dtype)
            if self.training and cfg.jitter > 0:
                # Switch Transformer's jitter: multiplicative noise on the router input.
                h = h * torch.empty_like(h).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
            logits = F.linear(h, self.router.weight.to(dtype))               # (N, E)
            if cfg.router == "softmax":
                probs = logits.softmax(dim=-1)                               # (N, E) Eq. 1
                scores = probs
            else:
                # DeepSeek-V3: independent sigmoid affinities choose the experts; for the balance
                # loss they are normalised over experts so P_e is a distribution again.
                scores = torch.sigmoid(logits)                               # (N, E)
                probs = scores / scores.sum(-1, keepdim=True)
            gate, index = scores.topk(cfg.top_k, dim=-1)                     # (N, k), (N, k)
            if cfg.normalize_topk:
                # Eq. 2: softmax over the k kept logits == renormalised full softmax. With top_k=1
                # every gate is 1 and the router learns from the balance loss alone; set
                # normalize_topk=False for Switch-style gates p_e that carry the task gradient.
                gate = gate / gate.sum(-1, keepdim=True)
        return logits, probs, gate, index

    def _position_route(self, pos: torch.Tensor, dtype: torch.dtype):
        """A fixed, input-independent routing (the moe-random control): the token at position t of
        its clip goes to experts (t + r) mod E for r < k, with gates 1/k. No router weights,
        uniform P_e (so the balance loss has no gradient); separates "more parameters" from
        "learned routing"."""
        E, k, N = self.cfg.n_experts, self.cfg.top_k, pos.shape[0]
        index = (pos[:, None] + torch.arange(k, device=pos.device)) % E      # (N, k) distinct
        probs = torch.full((N, E), 1.0 / E, device=pos.device, dtype=torch.promote_types(dtype, torch.float32))
        return probs.new_zeros(N, E), probs, probs.new_full((N, k), 1.0 / k), index

    # -- dispatch ----------------------------------------------------------------------------------

    def _dispatch(self, h: torch.Tensor, gate: torch.Tensor, index: torch.Tensor):
        """Run each routed expert once on the token-slots sent to it.

        h: (N, D); gate, index: (N, k). Returns (out (N, O), gate_applied (N, k), share of slots
        dropped by the capacity limit). Slot n*k + r is token n's r-th choice. Slots are sorted by
        expert, so each expert sees one contiguous block of rows and runs one matmul pair on it;
        inside an expert's block they are in priority order: every token's first choice before
        any second choice, then earlier tokens first (GShard's order).

        Capacity (capacity_factor set): each expert takes at most C = ceil(cf * N * k / E)
        slots, in that priority order. An overflowing slot is dropped: it contributes nothing, the
        other gates are NOT renormalised, and the token still gets its shared experts and kept
        slots. Dropped slots show as expert_weight 0 in aux.
        """
        N, k = index.shape
        E, O = self.cfg.n_experts, self.cfg.d_out
        slot_expert = index.reshape(-1)                                      # (N*k,) token-major
        slot = torch.arange(N * k, device=h.device)                          # (N*k,) = n*k + r
        priority = (slot % k) * N + slot // k                                # choice first, then token
        order = torch.argsort(slot_expert * (N * k) + priority)              # (N*k,) grouped by expert
        counts = torch.bincount(slot_expert, minlength=E)                    # (E,)
        if self.cfg.capacity_factor is not None:
            capacity = math.ceil(self.cfg.capacity_factor * N * k / E)
            start = torch.cumsum(counts, 0) - counts                         # (E,) block offsets
            # Rank inside the expert's block = sorted position (the same arange as `slot`)
            # minus the block's start; the first C of each block are kept.
            keep_sorted = slot - start[slot_expert[order]] < capacity        # (N*k,) sorted order
            kept = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)  # (N*k,) by slot
            gate = gate * kept.view(N, k)                                    # dropped -> gate 0
            order = order[keep_sorted]                                       # (S,) S <= N*k
            counts = counts.clamp(max=capacity)
        rows = h.index_select(0, order // k)                                 # (S, D) gathered
        outs = [self.experts[e](chunk)                                       # (S_e, O) per expert
                for e, chunk in enumerate(rows.split(counts.tolist())) if chunk.shape[0]]
        y_sorted = torch.cat(outs) if outs else h.new_zeros(0, O)            # (S, O)
        if order.numel() == N * k:                                           # dropless: a permutation
            inverse = torch.empty_like(order).scatter_(0, order, slot)       # slot -> sorted position
            y_slots = y_sorted.index_select(0, inverse)                      # (N*k, O)
        else:
            y_slots = y_sorted.new_zeros(N * k, O).index_copy(0, order, y_sorted)
        # Eq. 3, sum over the k slots of each token: one (1, k) @ (k, O) product per token.
        y = torch.bmm(gate.unsqueeze(1).to(y_slots.dtype), y_slots.view(N, k, O)).squeeze(1)
        dropped = 1.0 - order.numel() / max(N * k, 1)
        return y, gate, dropped                                              # (N, O), (N, k)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        cfg = self.cfg
        check_input(x, mask, cfg.d_in)
        tokens, tok_mask = stack_frames(x, mask, cfg.stack)                  # (B, T', D), (B, T')
        B, T_tok, D = tokens.shape
        # Only real tokens are normalised, routed and counted: gather them into N rows.
        h = tokens.reshape(B * T_tok, D) if tok_mask is None else tokens[tok_mask]   # (N, D)
        h = self.norm_in(h)
        N = h.shape[0]

        y = self.shared(h) if self.shared is not None else 0.0              # (N, O)
        if cfg.n_experts:
            if cfg.router == "position":
                pos = torch.arange(T_tok, device=h.device).expand(B, T_tok)  # (B, T') token positions
                route = self._position_route(pos.reshape(-1) if tok_mask is None else pos[tok_mask], h.dtype)
            else:
                route = self._route(h)
            logits, probs, gate, index = route                               # (N,E),(N,E),(N,k),(N,k)
            routed, gate_applied, dropped = self._dispatch(h, gate, index)   # (N, O), (N, k)
            y = y + routed                                                   # Eq. 3
            balance = load_balancing_loss(probs, index)
            z = router_z_loss(logits)
            load = torch.bincount(index.reshape(-1), minlength=cfg.n_experts).to(probs.dtype)
            load = load / max(index.numel(), 1)                              # (E,)
            prob = probs.mean(0) if N else probs.new_zeros(cfg.n_experts)     # (E,) P_e
            dropped = probs.new_tensor(dropped)
        else:
            index = h.new_zeros(N, 0, dtype=torch.long)
            gate_applied = h.new_zeros(N, 0, dtype=torch.float32)
            balance = z = dropped = h.new_zeros((), dtype=torch.float32)
            load = prob = h.new_zeros(0, dtype=torch.float32)
        y = self.norm_out(y)                                                 # (N, O) Eq. 3

        y, grids = _unpack_tokens(y, index, gate_applied, tok_mask, B, T_tok)
        aux = dict(loss=cfg.balance_weight * balance + cfg.z_weight * z, balance_loss=balance,
                   z_loss=z, expert_load=load, router_prob=prob, dropped=dropped, **grids)
        return y, aux


def _unpack_tokens(y, index, weight, tok_mask, B, T_tok):
    """Put the N real-token rows back into (B, T', ...) grids; padding gets 0, index -1.

    Returns (y (B, T', O), dict of expert_index, expert_weight, mask).
    """
    k = index.shape[-1]
    if tok_mask is None:
        return y.reshape(B, T_tok, y.shape[-1]), dict(
            expert_index=index.reshape(B, T_tok, k), expert_weight=weight.reshape(B, T_tok, k),
            mask=torch.ones(B, T_tok, dtype=torch.bool, device=y.device))
    y_full = y.new_zeros(B, T_tok, y.shape[-1])
    y_full[tok_mask] = y
    index_full = index.new_full((B, T_tok, k), -1)
    index_full[tok_mask] = index
    weight_full = weight.new_zeros(B, T_tok, k)
    weight_full[tok_mask] = weight
    return y_full, dict(expert_index=index_full, expert_weight=weight_full, mask=tok_mask)


# ----------------------------------------------------------------------------------------------
# Dense baseline, sizing and accounting


class DenseAdapter(nn.Module):
    """The paper's dense baseline: LN -> Linear(D -> H) -> SiLU -> Linear(H -> O) -> LN.

    Same call and aux record as MoEAdapter, read as one expert that takes every token with gate 1,
    so the two swap by one config string (`build_adapter`). Its losses are zero.
    Deviation: the paper names no activation for the dense adapter; we use SiLU, as in its experts.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, stack: int = 1):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out), ("stack", stack)):
            if v < 1:
                raise ValueError(f"DenseAdapter {name} must be >= 1, got {v}")
        self.d_in, self.stack = d_in, stack
        self.norm_in = nn.LayerNorm(stack * d_in)
        self.mlp = Expert(stack * d_in, d_hidden, d_out)
        self.norm_out = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        check_input(x, mask, self.d_in)
        tokens, tok_mask = stack_frames(x, mask, self.stack)                 # (B, T', D)
        B, T_tok, D = tokens.shape
        h = tokens.reshape(B * T_tok, D) if tok_mask is None else tokens[tok_mask]   # (N, D)
        y = self.norm_out(self.mlp(self.norm_in(h)))                         # (N, O)
        N = h.shape[0]
        zero = h.new_zeros((), dtype=torch.float32)
        y, grids = _unpack_tokens(y, h.new_zeros(N, 1, dtype=torch.long),
                                  h.new_ones(N, 1, dtype=torch.float32), tok_mask, B, T_tok)
        aux = dict(loss=zero, balance_loss=zero, z_loss=zero, dropped=zero,
                   expert_load=h.new_ones(1, dtype=torch.float32),
                   router_prob=h.new_ones(1, dtype=torch.float32), **grids)
        return y, aux


def count_params(module: nn.Module) -> dict:
    """Total and active (per token) parameters and per-token FLOPs of an adapter.

    FLOPs are 2 x the multiply-accumulates of the weight matrices a token passes through
    (router, its k routed experts, the shared experts; for DenseAdapter its two matrices);
    biases, norms, SiLU and the gate products are O(width) and left out.
    """
    total = sum(p.numel() for p in module.parameters())
    if isinstance(module, MoEAdapter):
        cfg = module.cfg
        D, O = cfg.d_token, cfg.d_out
        per_expert = sum(p.numel() for p in module.experts[0].parameters()) if cfg.n_experts else 0
        active = total - (cfg.n_experts - cfg.top_k) * per_expert
        macs = D * cfg.n_experts * (module.router is not None) + (cfg.top_k * cfg.d_expert + cfg.n_shared * cfg.d_shared) * (D + O)
    elif isinstance(module, DenseAdapter):
        active = total
        macs = module.mlp.fc1.weight.numel() + module.mlp.fc2.weight.numel()
    else:
        raise TypeError(f"count_params takes a MoEAdapter or DenseAdapter, got {type(module).__name__}")
    return dict(total=total, active=active, flops_per_token=2 * macs)


def dense_hidden_for(cfg: MoEAdapterConfig, match: str = "params") -> int:
    """Hidden width H of the DenseAdapter matched to the MoE adapter of `cfg`, rounded.

    match="params": equal total parameters, the paper's comparison (at its shapes the MoE then
        spends ~75% of the dense compute). Dense total = H (D + O + 1) + O + norms.
    match="flops": equal per-token FLOPs, dense against the MoE's ACTIVE work (router, k experts,
        shared experts): H (D + O) = D E + (k H_e + n_s H_s)(D + O). The fairer comparison.
    """
    if match not in ("params", "flops"):
        raise ValueError(f"unknown match {match!r}; allowed: params, flops")
    with torch.device("meta"):                         # shapes only: no memory, no init cost
        moe = count_params(MoEAdapter(cfg))
    D, O = cfg.d_token, cfg.d_out
    if match == "params":
        return round((moe["total"] - O - 2 * (D + O)) / (D + O + 1))
    return round(moe["flops_per_token"] / 2 / (D + O))


def build_adapter(kind: str, cfg: MoEAdapterConfig) -> nn.Module:
    """One config string picks the adapter: "moe", "moe-random" (the same MoE routed by the token's
    position alone), "dense-params" (the paper's equal-parameter baseline) or
    "dense-flops" (compute-matched to the MoE's active work)."""
    if kind == "moe":
        return MoEAdapter(cfg)
    if kind == "moe-random":                           # the control: same experts, fixed routing
        return MoEAdapter(replace(cfg, router="position"))
    if kind in ("dense-params", "dense-flops"):
        hidden = dense_hidden_for(cfg, match=kind.split("-")[1])
        return DenseAdapter(cfg.d_in, hidden, cfg.d_out, stack=cfg.stack)
    raise ValueError(f"unknown adapter kind {kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")
