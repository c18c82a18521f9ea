"""MoE-Adapter: a sparse mixture-of-experts bridge from an audio encoder to a decoder LLM.

Lei, He et al., "MoE Adapter for Large Audio Language Models: Sparsity, Disentanglement, and
Gradient-Conflict-Free", arXiv 2601.02967 (ACL 2026 Findings). Torch + stdlib only: copy it alone.

    encoder frames (B, T, d_in) --stack--> tokens (B, T', S*d_in) --LN--> h
    y = LN( sum_{e in top-k(h)} g_e(h) * E_e(h)  +  sum_s Shared_s(h) )      (B, T', d_out)

Notation: B batch, T encoder frames, S = stack (frames per token), T' = ceil(T / S) tokens, D = S * d_in
(token width), O = d_out (LLM width), E routed experts, k = top_k, N real (non-padding) tokens, H expert width.

Equations, as numbered in this file (the paper's own numbering is not available to us):
    (1) p = softmax(W_g h)                          router probabilities over all E experts
    (2) g_e = p_e / sum_{j in top-k} p_j, e in top-k  gates: softmax restricted to the top-k logits
    (3) y = LN(sum_e g_e E_e(h) + Shared(h))         E_e(h) = W2 SiLU(W1 h + b1) + b2
    (4) L_bal = E * sum_e f_e P_e                    Switch balance loss (Fedus et al. 2021), see load_balancing_loss
    (5) L_z = mean_n (logsumexp_e logits_ne)^2       ST-MoE router z-loss (Zoph et al. 2022)
"""
import json
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_KINDS = ("moe", "moe-random", "dense-params", "dense-flops")


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
    router: str = "softmax"        # "softmax" (the paper's) | "position" (moe-random)
    normalize_topk: bool = True    # renormalise the k gates to sum to 1 (the paper's Eq. 2)
    balance_weight: float = 1e-2   # Deviation: the paper publishes no weight; 1e-2 is Switch's default
    z_weight: float = 0.0          # ST-MoE router z-loss weight; the paper uses none
    norm_in: bool = True           # LayerNorm on the stacked token (the paper's)
    norm_out: bool = True          # LayerNorm on the adapter output (the paper's)

    def __post_init__(self):
        E, k, n_s = self.n_experts, self.top_k, self.n_shared
        for bad, message in [
            (min(self.d_in, self.d_out, self.stack) < 1, "d_in, d_out and stack must be >= 1"),
            (min(E, n_s) < 0 or E + n_s == 0, "n_experts and n_shared must be >= 0, with at least one expert"),
            (not (1 <= k <= E if E else k == 0), f"top_k must be in [1, n_experts={E}] (0 without routed experts)"),
            ((E and self.d_expert < 1) or (n_s and self.d_shared < 1), "d_expert and d_shared must be >= 1"),
            (self.router not in ("softmax", "position"), f"unknown router {self.router!r}; allowed: softmax, position"),
            (min(self.balance_weight, self.z_weight) < 0, "balance_weight and z_weight must be >= 0"),
        ]:
            if bad:
                raise ValueError(f"{message}; got {self}")

    @property
    def d_token(self) -> int:  # width D of a stacked token: what the norm, router and experts see
        return self.stack * self.d_in

    @classmethod
    def paper(cls, **overrides) -> "MoEAdapterConfig":
        """The paper's adapter (Table 4): 94.4M parameters, 70.8M active, on 2560-wide tokens at 12.5 Hz. Deviation:
        it gives no count of shared experts; ONE of hidden 10240 beside the 8 routed reproduces its totals exactly."""
        return cls(**{**dict(d_in=2560, d_out=2048, stack=1, n_experts=8, top_k=4, d_expert=1280,
                             n_shared=1, d_shared=10240, router="softmax"), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "MoEAdapterConfig":  # CPU-sized: 64-wide frames x4, 8 experts top-2, 1 shared
        return cls(**overrides)


class Expert(nn.Module):
    """Linear(D -> H) -> SiLU -> Linear(H -> O): one routed or shared expert."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, O)
        return self.fc2(F.silu(self.fc1(h)))


def stack_frames(x: torch.Tensor, mask: Optional[torch.Tensor], d_in: int, stack: int):
    """Check the call, stack frames, keep the N real tokens (a host sync: N is a shape): h (N, D), idx (N,) their
    flat positions in B*T' (None without a mask), token mask (B, T'). Padding zeroed; a token is real if a frame is."""
    if x.dim() != 3 or x.shape[-1] != d_in or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, T, d_in={d_in}) tensor, got {x.dtype} {tuple(x.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(f"mask must be a bool (B, T) = {tuple(x.shape[:2])} tensor, got {mask.dtype} {tuple(mask.shape)}")
    B, T, d = x.shape
    T_tok, pad = -(-T // stack), -T % stack                                  # T' = ceil(T / S), frames to pad
    x = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)            # garbage never leaks in
    tokens = (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B * T_tok, stack * d)  # (B*T', D), last stack 0-padded
    if mask is None:
        return tokens, None, torch.ones(B, T_tok, dtype=torch.bool, device=x.device)
    tok_mask = F.pad(mask, (0, pad), value=False).reshape(B, T_tok, stack).any(-1)   # (B, T')
    idx = tok_mask.reshape(-1).nonzero().squeeze(1)                          # (N,)
    return tokens.index_select(0, idx), idx, tok_mask


def _outputs(y, index, weight, idx, mask, **losses):
    """Put the (N, ...) real-token rows back on the (B, T', ...) grid (padding: 0, index -1)."""
    def grid(rows, fill=0):
        if idx is not None:
            rows = rows.new_full((mask.numel(), *rows.shape[1:]), fill).index_copy(0, idx, rows)
        return rows.reshape(*mask.shape, *rows.shape[1:])
    return grid(y), dict(**losses, expert_index=grid(index, -1), expert_weight=grid(weight), mask=mask)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Eq. 4 over the real tokens of ONE call: probs (N, E) over ALL experts (full softmax, not the gates),
    expert_index (N, k). f_e = slots sent to e / (N * k), a hard count; P_e = mean_n probs[n, e] carries
    the gradient. 1.0 = balanced, E = all on one expert (HF Mixtral divides f by N: k when balanced)."""
    N, E = probs.shape
    f = F.one_hot(expert_index.reshape(-1), E).sum(0).to(probs.dtype) / max(expert_index.numel(), 1)  # (E,)
    return E * (f * probs.mean(0)).sum() if N else probs.sum() * 0.0         # no real tokens: no loss


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5, ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean() if logits.shape[0] else logits.sum() * 0.0


class MoEAdapter(nn.Module):
    """Sparse MoE adapter: `y, aux = adapter(x, mask)`, x (B, T, d_in) encoder frames, mask (B, T) bool
    (True = real frame) or None, y (B, T', d_out) zero at padding tokens. aux holds:
        loss                        balance_weight * balance_loss + z_weight * z_loss (add it to the task loss)
        balance_loss, z_loss        Eq. 4 over this call's real tokens (1.0 = balanced), Eq. 5
        expert_load, router_prob    (E,) f_e (no gradient), P_e of Eq. 4 (for Eq. 4 over a global batch)
        expert_index, expert_weight (B, T', k) experts (-1 at padding), gates applied (0 at padding)
        mask                        (B, T') bool, real tokens"""

    def __init__(self, cfg: MoEAdapterConfig):
        super().__init__()
        self.cfg, D, O = cfg, cfg.d_token, cfg.d_out
        self.norm_in = nn.LayerNorm(D) if cfg.norm_in else nn.Identity()
        self.router = nn.Linear(D, cfg.n_experts, bias=False) if cfg.n_experts and cfg.router != "position" else None
        self.experts = nn.ModuleList(Expert(D, cfg.d_expert, O) for _ in range(cfg.n_experts))
        # n shared experts of width H_s are one MLP of width n*H_s (hidden units concatenated, biases merged).
        self.shared = Expert(D, cfg.n_shared * cfg.d_shared, O) if cfg.n_shared else None
        self.norm_out = nn.LayerNorm(O) if cfg.norm_out else nn.Identity()

    def _route(self, h: torch.Tensor, idx: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        """Router logits, full probabilities (for the loss) and top-k gates for h (N, D), float32 under bf16
        autocast (near-ties flip experts). moe-random (no router): the token at position t of its clip (idx, mask:
        from stack_frames) goes to experts (t + r) mod E, r < k, gates 1/k, uniform P_e (no balance gradient)."""
        cfg, dtype = self.cfg, torch.promote_types(h.dtype, torch.float32)
        if self.router is None:
            E, k = cfg.n_experts, cfg.top_k
            pos = (torch.arange(mask.numel(), device=mask.device) if idx is None else idx) % mask.shape[1]  # (N,) t
            index = (pos[:, None] + torch.arange(k, device=pos.device)) % E  # (N, k) distinct
            probs = torch.full((pos.shape[0], E), 1.0 / E, device=pos.device, dtype=dtype)
            return probs.new_zeros(probs.shape), probs, probs.new_full((pos.shape[0], k), 1.0 / k), index
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = F.linear(h.to(dtype), self.router.weight.to(dtype))    # (N, E)
            probs = logits.softmax(dim=-1)                                   # (N, E) Eq. 1
            gate, index = probs.topk(cfg.top_k, dim=-1)                      # (N, k), (N, k)
            if cfg.normalize_topk:  # Eq. 2 (= softmax over the k kept logits); all gates 1 at top_k=1
                gate = gate / gate.sum(-1, keepdim=True)
        return logits, probs, gate, index

    def _dispatch(self, h: torch.Tensor, gate: torch.Tensor, index: torch.Tensor):
        """Each routed expert once on its token-slots, dropless: h (N, D), gate, index (N, k) -> out (N, O).
        Slots (n*k + r: token n's r-th choice) are sorted by expert (first choices, then second ones, each by token)."""
        (N, k), E, O = index.shape, self.cfg.n_experts, self.cfg.d_out
        slot_expert, slot = index.reshape(-1), torch.arange(N * k, device=h.device)  # (N*k,), slot = n*k + r
        order = torch.argsort(slot_expert * (N * k) + (slot % k) * N + slot // k)  # (N*k,) by expert, choice, token
        sizes = F.one_hot(slot_expert, E).sum(0).tolist()  # the routing's one host sync: each expert's row count
        rows = h.index_select(0, order // k)                                 # (N*k, D) gathered
        outs = [self.experts[e](chunk) for e, chunk in enumerate(rows.split(sizes)) if chunk.shape[0]]
        y_sorted = torch.cat(outs) if outs else h.new_zeros(0, O)            # (N*k, O)
        y_slots = y_sorted.new_zeros(N * k, O).index_copy(0, order, y_sorted)  # (N*k, O) back in slot order
        return torch.bmm(gate.unsqueeze(1).to(y_slots.dtype), y_slots.view(N, k, O)).squeeze(1)  # (N, O) Eq. 3

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        cfg, E = self.cfg, self.cfg.n_experts
        h, idx, tok_mask = stack_frames(x, mask, cfg.d_in, cfg.stack)        # (N, D), (N,), (B, T')
        h, N = self.norm_in(h), h.shape[0]
        y = self.shared(h) if self.shared is not None else 0.0              # (N, O)
        if E:
            logits, probs, gate, index = self._route(h, idx, tok_mask)       # (N, E) x2, (N, k) x2
            y = y + self._dispatch(h, gate, index)                           # (N, O) Eq. 3
            balance, z = load_balancing_loss(probs, index), router_z_loss(logits)
            load = F.one_hot(index.reshape(-1), E).sum(0).to(probs.dtype) / max(index.numel(), 1)  # (E,) f_e
            prob = probs.mean(0) if N else probs.new_zeros(E)                # (E,) P_e
        else:                                                                # shared experts only
            index, gate = h.new_zeros(N, 0, dtype=torch.long), h.new_zeros(N, 0, dtype=torch.float32)
            balance = z = h.new_zeros((), dtype=torch.float32)
            load = prob = h.new_zeros(0, dtype=torch.float32)
        y = self.norm_out(y)                                                 # (N, O) Eq. 3
        return _outputs(y, index, gate, idx, tok_mask, loss=cfg.balance_weight * balance + cfg.z_weight * z,
                        balance_loss=balance, z_loss=z, expert_load=load, router_prob=prob)


class DenseAdapter(nn.Module):
    """The paper's dense baseline LN -> Linear(D -> H) -> SiLU -> Linear(H -> O) -> LN, with MoEAdapter's
    call and aux (one expert taking every token with gate 1, zero losses): the two swap in `build_adapter`.
    Deviation: the paper names no activation for the dense adapter; we use SiLU, as in its experts."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, stack: int = 1):
        super().__init__()
        if min(d_in, d_hidden, d_out, stack) < 1:
            raise ValueError(f"DenseAdapter: sizes must be >= 1, got {d_in=}, {d_hidden=}, {d_out=}, {stack=}")
        self.d_in, self.stack = d_in, stack
        self.norm_in = nn.LayerNorm(stack * d_in)
        self.mlp = Expert(stack * d_in, d_hidden, d_out)
        self.norm_out = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        h, idx, tok_mask = stack_frames(x, mask, self.d_in, self.stack)      # (N, D), (N,), (B, T')
        y = self.norm_out(self.mlp(self.norm_in(h)))                         # (N, O)
        zero, one, N = h.new_zeros((), dtype=torch.float32), h.new_ones(1, dtype=torch.float32), h.shape[0]
        return _outputs(y, h.new_zeros(N, 1, dtype=torch.long), h.new_ones(N, 1, dtype=torch.float32), idx, tok_mask,
                        loss=zero, balance_loss=zero, z_loss=zero, expert_load=one, router_prob=one)


def count_params(module: nn.Module) -> dict:
    """Total and active (per token) parameters, and per-token FLOPs: 2 x the multiply-accumulates of the
    weight matrices a token passes through (router, k routed experts, shared experts; the dense MLP)."""
    total = sum(p.numel() for p in module.parameters())
    if isinstance(module, DenseAdapter):
        return dict(total=total, active=total, flops_per_token=2 * (module.mlp.fc1.weight.numel()
                                                                    + module.mlp.fc2.weight.numel()))
    if not isinstance(module, MoEAdapter):
        raise TypeError(f"count_params takes a MoEAdapter or DenseAdapter, got {type(module).__name__}")
    c, D, O = module.cfg, module.cfg.d_token, module.cfg.d_out
    idle = (c.n_experts - c.top_k) * ((D + 1) * c.d_expert + (c.d_expert + 1) * O)   # unchosen experts' weights
    macs = D * c.n_experts * (module.router is not None) + (c.top_k * c.d_expert + c.n_shared * c.d_shared) * (D + O)
    return dict(total=total, active=total - idle, flops_per_token=2 * macs)


def dense_hidden_for(cfg: MoEAdapterConfig, match: str = "params") -> int:
    """Hidden width H of the DenseAdapter matched to the MoE of `cfg`: equal parameters (match="params", the paper's:
    H (D + O + 1) + O + norms) or equal active FLOPs (match="flops": H (D + O) = D E + (k H_e + n_s H_s)(D + O))."""
    if match not in ("params", "flops"):
        raise ValueError(f"unknown match {match!r}; allowed: params, flops")
    with torch.device("meta"):                                               # shapes only, no memory
        moe = count_params(MoEAdapter(cfg))
    D, O = cfg.d_token, cfg.d_out
    return round((moe["total"] - O - 2 * (D + O)) / (D + O + 1) if match == "params"
                 else moe["flops_per_token"] / 2 / (D + O))


def build_adapter(kind: str, cfg: MoEAdapterConfig) -> nn.Module:
    """One config string picks the adapter: "moe", "moe-random" (the same experts routed by position
    alone), "dense-params" (the paper's equal-parameter baseline), "dense-flops" (compute-matched)."""
    if kind in ("moe", "moe-random"):
        return MoEAdapter(cfg if kind == "moe" else replace(cfg, router="position"))
    if kind in ("dense-params", "dense-flops"):
        return DenseAdapter(cfg.d_in, dense_hidden_for(cfg, match=kind.split("-")[1]), cfg.d_out, stack=cfg.stack)
    raise ValueError(f"unknown adapter kind {kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")


def load_adapter(path: str) -> nn.Module:
    """An adapter written by `python eval.py RUN_DIR --export PATH`: build_adapter of PATH.json's kind and config, with
    the "adapter.*" weights of PATH.pt (a plain state dict; its "lora.*" / "llm.*" are the LLM's), in eval mode."""
    root = path[:-3] if path.endswith(".pt") else path
    with open(root + ".json") as f:
        meta = json.load(f)
    adapter = build_adapter(meta["kind"], MoEAdapterConfig(**meta["config"]))
    state = torch.load(root + ".pt", map_location="cpu", weights_only=True)
    adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
    return adapter.eval()
