"""Hugging Face checkpoints (local paths; nothing is downloaded) into this project's models: one safe reader (a folder,
.safetensors, .bin/.pt, a sharded index), a name map per family, one strict check; the model files never import it."""
import json
import os
import re
from collections import namedtuple
from dataclasses import fields, replace
from difflib import get_close_matches
from typing import Dict, Mapping, Optional, Tuple

import torch

from encoder import AST, POS_RESIZE, WHISPER_SIZES, ASTConfig, WhisperEncoder, WhisperEncoderConfig, resize_pos_embed
from llm import LLM, LLMConfig

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_weight_file(path: str) -> Dict[str, torch.Tensor]:
    """name -> tensor from one .safetensors / .bin / .pt / .pth file (weights_only: never runs code)."""
    if not path.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise ValueError(f"unknown weight file type {path!r}; expected .safetensors, .bin, .pt, .pth or an index .json")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ImportError(f"reading {path} needs safetensors (pip install safetensors) or a .bin/.pt copy") from None
    except Exception as e:                      # a truncated or foreign file: one error that names it
        raise ValueError(f"{path}: unreadable weight file ({type(e).__name__}: {str(e)[:300]})") from None
    return _flat(sd, path)


def _flat(sd, where: str) -> Dict[str, torch.Tensor]:
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)] if isinstance(sd, Mapping) else ["<not a dict>"]
    if bad:
        raise ValueError(f"{where} does not hold a flat state dict (name -> tensor): {bad[:5]} are not tensors "
                         f"(a training checkpoint? pass its model state dict)")
    return dict(sd)


def read_checkpoint(src) -> Tuple[Dict[str, torch.Tensor], str, Optional[dict]]:
    """A state dict, folder, weight file or sharded index (weight_map: key -> shard) -> (state dict, source, config)."""
    if isinstance(src, Mapping):
        return _flat(src, "the state dict"), "<state dict>", None
    path = os.fspath(src)
    if os.path.isdir(path):
        if not (found := [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]):
            raise FileNotFoundError(f"no weights in {path}; looked for {', '.join(WEIGHT_FILES)}")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    folder = os.path.dirname(path)
    if path.endswith(".json"):
        weight_map = idx.get("weight_map") if isinstance(idx := _json(path), dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path} has no weight_map; expected a sharded-checkpoint index")
        shards = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        sd = {k: v for shard in shards for k, v in read_weight_file(shard).items()}
        if missing := sorted(set(weight_map) - set(sd)):
            raise ValueError(f"shards of {path} lack keys its weight_map lists: {missing[:10]}")
    else:
        sd = read_weight_file(path)
    return sd, os.fspath(src), _json(os.path.join(folder, "config.json"))    # config.json beside the weights, if any


def _json(path: str) -> Optional[dict]:
    """A JSON file (None if absent); not JSON is an error that names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _load_checked(model, mapped: Mapping, where: str, origin=None, unexpected=(), fresh=(), assign=False) -> None:
    """Our names -> tensors into `model` after a strict check: every missing, unexpected, wrong-shaped tensor named by
    its checkpoint name (origin: ours -> theirs), and nothing loaded; only `fresh` model tensors may be absent."""
    expected, name = model.state_dict(), (origin or {}).get
    problems = {"missing from the checkpoint": [k for k in expected if k not in mapped and k not in fresh],
                "unexpected in the checkpoint": list(unexpected) + [name(k, k) for k in mapped if k not in expected],
                "wrong shape": [f"{name(k, k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                                for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]}
    if any(problems.values()):
        raise ValueError(f"{type(model).__name__} checkpoint {where} does not fit {model.cfg}; nothing was loaded:"
                         + "".join(f"\n  {len(got)} {title}:\n    " + "\n    ".join(got[:25])  # the first 25
                                   for title, got in problems.items() if got))
    model.load_state_dict(mapped, strict=False, assign=assign)  # assign: take the tensors (a meta-device model)


# --- Audio encoders (AST, Whisper): name maps and loaders -----------------------------------------

# Published head counts (64-dim heads): DeiT tiny / small / base, ViT-large (AST); Whisper tiny .. large-v3.
HEADS_BY_WIDTH = {192: 3, **{d: h for d, _, h, _ in WHISPER_SIZES.values()}}

# A key format: (top-level names, the blocks' prefix, names inside block N), HF -> ours, less .weight / .bias.
_AST_TOP = {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
            "embeddings.position_embeddings": "pos_embed", "layernorm": "norm",
            "embeddings.patch_embeddings.projection": "patch_embed",
            "classifier.layernorm": "head.norm", "classifier.dense": "head.fc"}
_AST_FORMATS = {  # the Hub's files and save_pretrained hold the <5 names; transformers>=5 in memory the others
    "transformers<5 names (encoder.layer.N.attention.attention.query)": (_AST_TOP, "encoder.layer", {
        "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
        "attention.attention.value": "attn.v", "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2", "layernorm_before": "norm1", "layernorm_after": "norm2"}),
    "transformers>=5 names (layers.N.attention.q_proj)": (_AST_TOP, "layers", {
        "attention.q_proj": "attn.q", "attention.k_proj": "attn.k", "attention.v_proj": "attn.v",
        "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "layernorm_before": "norm1", "layernorm_after": "norm2"})}
_WHISPER_FORMATS = {"transformers Whisper names (layers.N.self_attn.q_proj)": (
    {"conv1": "conv1", "conv2": "conv2", "embed_positions.weight": "pos_embed", "layer_norm": "norm"}, "layers", {
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
        "fc1": "mlp.fc1", "fc2": "mlp.fc2"})}
_WHISPER_SKIP = ("decoder", "proj_out", "projector", "classifier", "layer_weights")  # counted, not loaded


def _map_names(sd: Mapping[str, torch.Tensor], formats: dict, prefix: str):
    """Names less `prefix` in the key format naming most -> (format, ours -> tensor, ours -> theirs, unmatched)."""
    def rename(name, top, layer_prefix, layer):  # HF -> ours, or None
        stem, _, p = (name := name.removeprefix(prefix)).rpartition(".")
        if name in top or (stem in top and p in ("weight", "bias")):
            return top[name] if name in top else f"{top[stem]}.{p}"
        hit = re.fullmatch(rf"{re.escape(layer_prefix)}\.(\d+)\.(.+)\.(weight|bias)", name)
        return f"blocks.{hit[1]}.{layer[hit[2]]}.{hit[3]}" if hit and hit[2] in layer else None
    fmt = max(formats, key=lambda f: sum(rename(k, *formats[f]) is not None for k in sd))
    ours = {k: rename(k, *formats[fmt]) for k in sd}
    return (fmt, {o: sd[k] for k, o in ours.items() if o}, {o: k for k, o in ours.items() if o},
            [k for k, o in ours.items() if o is None])


class LoadReport(namedtuple("LoadReport", "model source key_format config n_loaded n_params fresh skipped notes")):
    """What a loader did (`print(report)`): n_loaded tensors copied into a model of n_params; fresh: model tensors not
    from the checkpoint (adapters, a new head); skipped: groups not loaded -> count; notes: non-inferred settings."""

    def __str__(self) -> str:
        rows = [("key format", self.key_format), ("config", repr(self.config)),
                ("tensors", f"{self.n_loaded} loaded, {len(self.fresh)} initialised here (adapters / new head), "
                            f"{self.n_params:,} parameters in the model")]
        rows += [("skipped", f"{n} tensors of the {g}") for g, n in self.skipped.items()] + [("note", n) for n in self.notes]
        return "\n".join([f"{self.model} loaded from {self.source}"] + [f"  {k:<11}: {v}" for k, v in rows])


def _sizes(cls, mapped, overrides: dict, hf: dict, heads_key: str, notes: list, **sizes):
    """Config fields from the shapes, n_heads (q, k, v are d x d for any count) from the override, config.json or the
    published count; overrides must be fields (did-you-mean) and agree with the shapes."""
    known = {f.name for f in fields(cls)}
    for key in [k for k in overrides if k not in known]:
        close = get_close_matches(key, known, n=1)
        raise ValueError(f"unknown override {key!r} for {cls.__name__}; "
                         + (f"did you mean {close[0]!r}?" if close else f"expected one of {sorted(known)}"))
    sizes["n_layers"] = 1 + max((int(k.split(".")[1]) for k in mapped if k.startswith("blocks.")), default=-1)
    if "blocks.0.mlp.fc1.weight" in mapped:
        sizes["d_ff"] = mapped["blocks.0.mlp.fc1.weight"].shape[0]
    for key in [k for k in sizes if overrides.get(k, sizes[k]) != sizes[k]]:
        raise ValueError(f"override {key}={overrides[key]!r} conflicts with the checkpoint's {key}={sizes[key]!r}")
    d = sizes["d"]
    for value, where in ((overrides.get("n_heads"), "the override"), (hf.get(heads_key), f"config.json ({heads_key})"),
                         (HEADS_BY_WIDTH.get(d), f"the published size for width {d} (heads are not in the shapes)")):
        if value is not None:
            notes.append(f"n_heads = {value} from {where}")
            return {**sizes, "n_heads": value}
    raise ValueError(f"cannot infer the number of attention heads for width d = {d} (not a published size "
                     f"{sorted(HEADS_BY_WIDTH)}, no config.json beside the checkpoint); pass n_heads=... to the loader")


def _load_into(model, mapped, origin, unexpected, source, fmt, skipped, notes, fresh_prefixes=()):
    fresh = [k for k in model.state_dict() if ".adapters." in k or k.startswith(fresh_prefixes)]
    _load_checked(model, mapped, f"{source} ({fmt})", origin, unexpected, fresh)  # copies into float32 tensors
    return model.eval(), LoadReport(type(model).__name__, source, fmt, model.cfg, len(mapped),
                                    sum(p.numel() for p in model.parameters()), fresh, skipped, notes)


def load_ast(src, *, pos_resize: str = "ast", **overrides) -> Tuple[AST, LoadReport]:
    """transformers' ASTModel / ASTForAudioClassification (folder, weight file, state dict or read_checkpoint's tuple)
    -> (encoder.AST, LoadReport). Shapes give d, n_layers, d_ff, patch, qkv_bias, the classifier ("cls_dist" head;
    n_classes=0 drops it, another count gets a fresh one); n_heads, num_mel_bins, strides, norm_eps, max_length:
    overrides, else config.json, else AST-Base. A patch grid other than the checkpoint's resizes the positions."""
    sd, source, hf_cfg = src if isinstance(src, tuple) else read_checkpoint(src)
    if pos_resize not in POS_RESIZE:
        raise ValueError(f"unknown pos_resize {pos_resize!r}; expected one of {POS_RESIZE}")
    fmt, mapped, origin, unmatched = _map_names(sd, _AST_FORMATS, "audio_spectrogram_transformer.")  # in ...ForAudio
    if "pos_embed" not in mapped or "patch_embed.weight" not in mapped:
        hint = " (these look like Whisper tensors: use load_whisper_encoder)" if any("conv1" in k for k in sd) else ""
        raise ValueError(f"{source} holds no AST embeddings.position_embeddings / patch_embeddings.projection{hint}")
    hf, notes, skipped = hf_cfg or {}, [], {}
    w = mapped["patch_embed.weight"]  # (d, 1, patch, patch)
    n_cls = mapped["head.fc.weight"].shape[0] if "head.fc.weight" in mapped else 0
    keep_head = n_cls > 0 and overrides.get("n_classes", n_cls) == n_cls  # ASTForAudioClassification's norm + Linear
    if n_cls and not keep_head:
        skipped[f"classifier head ({n_cls} classes; n_classes={overrides['n_classes']} asked)"] = sum(
            k.startswith("head.") for k in mapped)
        mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
    head = dict(n_classes=n_cls, head_pool="cls_dist", head_norm="head.norm.weight" in mapped) if keep_head else {}
    sizes = _sizes(ASTConfig, mapped, overrides, hf, "num_attention_heads", notes, d=w.shape[0],
                   patch=w.shape[-1], qkv_bias="blocks.0.attn.q.bias" in mapped, **head)
    c = {"num_mel_bins": hf.get("num_mel_bins", 128), "freq_stride": hf.get("frequency_stride", 10),
         "time_stride": hf.get("time_stride", 10), "norm_eps": hf.get("layer_norm_eps", 1e-12), **sizes, **overrides}
    # The checkpoint's own grid: frequency patches from its mel bins, time patches from the position table.
    src_mels = hf.get("num_mel_bins", overrides.get("num_mel_bins", 128))
    fs, n_patch = (src_mels - c["patch"]) // c["freq_stride"] + 1, mapped["pos_embed"].shape[1] - 2
    if fs < 1 or n_patch % fs:
        raise ValueError(f"position embeddings hold {n_patch} patches, not a multiple of {fs} frequency patches "
                         f"({src_mels} mel bins, patch {c['patch']}, stride {c['freq_stride']}); pass its num_mel_bins")
    ts = n_patch // fs
    cfg = ASTConfig(**{"max_length": hf.get("max_length", (ts - 1) * c["time_stride"] + c["patch"]), **c})
    if cfg.grid != (fs, ts):
        mapped["pos_embed"] = resize_pos_embed(mapped["pos_embed"], (fs, ts), cfg.grid, pos_resize)
        notes.append(f"positional embeddings resized from the checkpoint's {fs} x {ts} patch grid to "
                     f"{cfg.grid[0]} x {cfg.grid[1]} (max_length {cfg.max_length}) with method {pos_resize!r}")
    if new_head := bool(cfg.n_classes and not keep_head):
        notes.append(f"head: a fresh {cfg.n_classes}-class head on the {cfg.head_pool!r} pooled output")
    return _load_into(AST(cfg), mapped, origin, unmatched, source, fmt, skipped, notes, ("head.",) * new_head)


def load_whisper_encoder(src, **overrides) -> Tuple[WhisperEncoder, LoadReport]:
    """The encoder of WhisperForConditionalGeneration / WhisperModel or a bare one (src as load_ast's) -> (encoder.
    WhisperEncoder, LoadReport); decoder, proj_out, classifier skipped and counted; n_heads as load_ast's."""
    sd, source, hf_cfg = src if isinstance(src, tuple) else read_checkpoint(src)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in sd)), "")
    fmt, mapped, origin, unmatched = _map_names(sd, _WHISPER_FORMATS, prefix)
    if "conv1.weight" not in mapped or "pos_embed" not in mapped:
        hint = " (these look like AST tensors: use load_ast)" if any("position_embeddings" in k for k in sd) else ""
        raise ValueError(f"{source} holds no Whisper encoder ([model.][encoder.]conv1 / embed_positions){hint}")
    groups = {k: k.removeprefix("model.").split(".")[0] for k in unmatched if not k.startswith(prefix)}  # decoder, ...
    skipped = {g: list(groups.values()).count(g) for g in dict.fromkeys(groups.values()) if g in _WHISPER_SKIP}
    (d, n_mels, _), notes = mapped["conv1.weight"].shape, []  # conv1: (d, n_mels, 3)
    sizes = _sizes(WhisperEncoderConfig, mapped, overrides, hf_cfg or {}, "encoder_attention_heads", notes, d=d,
                   n_mels=n_mels, max_positions=len(mapped["pos_embed"]))
    return _load_into(WhisperEncoder(WhisperEncoderConfig(**{**sizes, **overrides})), mapped, origin,
                      [k for k in unmatched if groups.get(k) not in skipped], source,
                      fmt + (f", prefix {prefix!r}" if prefix else ""), skipped, notes)


# --- Decoder LLMs (Llama / Qwen2 / Qwen3 / SmolLM2): name map and loader ---------------------------

def config_from_hf(hf: Mapping, **overrides) -> LLMConfig:
    """LLMConfig from a llama / qwen2 / qwen3 config.json dict; `overrides` win. Variants llm.py lacks are refused by
    name; a list of EOS ids keeps its first; audio_token_id is a key of our own."""
    kind, act, rope, scaling = (hf.get("model_type"), hf.get("hidden_act", "silu"),
                                hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    types = ("llama", "qwen2", "qwen3")
    for bad, what in [(kind not in types, f"model_type {kind!r}; expected one of {types}"),
                      (act != "silu", f"hidden_act {act!r}; expected 'silu' (SwiGLU)"),
                      (hf.get("mlp_bias"), "mlp_bias=True; expected bias-free MLP projections"),
                      (hf.get("use_sliding_window"), "use_sliding_window=True; expected full attention"),
                      (rope_type != "default", f"RoPE type {rope_type!r} (scaling); expected 'default'")]:
        if bad:
            raise ValueError(f"config.json: not supported: {what}")
    n_heads, bias, eos = hf["num_attention_heads"], bool(hf.get("attention_bias")), hf.get("eos_token_id")
    cfg = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
               n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
               head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, norm_eps=hf.get("rms_norm_eps", 1e-6),
               rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),  # 10000: HF's default
               max_seq_len=hf.get("max_position_embeddings", 2048), qk_norm=kind == "qwen3",
               qkv_bias=kind == "qwen2" or bias, o_bias=kind != "qwen2" and bias, pad_id=hf.get("pad_token_id"),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_id=hf.get("bos_token_id"),
               eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos, audio_token_id=hf.get("audio_token_id"))
    return LLMConfig(**{**cfg, **overrides})


def load_llm(path_or_state_dict, config=None, *, dtype: Optional[torch.dtype] = None, device=None, **overrides) -> LLM:
    """An llm.LLM with the weights of a HF LLaMA / Qwen2 / Qwen3 checkpoint (`model.` names) or ours. config: an
    LLMConfig, a dict of its fields or of a config.json; None: the config.json beside the weights; `overrides`
    replace fields; dtype: default the checkpoint's."""
    sd, source, hf_config = read_checkpoint(path_or_state_dict)
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # an old buffer
    if isinstance(config, Mapping):
        config = config_from_hf(config) if "model_type" in config else LLMConfig(**config)
    if config is None and hf_config is None:
        raise ValueError(f"{source}: no config.json beside the weights; pass config (an LLMConfig or a dict)")
    if config is None:  # old config.json files lack tie_word_embeddings: the weights tell
        config = config_from_hf({"tie_word_embeddings": "lm_head.weight" not in sd, **hf_config}, **overrides)
    elif not isinstance(config, LLMConfig):
        raise TypeError(f"config must be an LLMConfig, a dict or None, got {type(config).__name__}")
    elif overrides:
        config = replace(config, **overrides)
    if (tied := config.tie_embeddings) and "lm_head.weight" in sd:
        head, emb = sd.pop("lm_head.weight"), sd.get("embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise ValueError(f"{source} has its own lm_head.weight but the config ties it to embed_tokens.weight; "
                             f"set tie_embeddings=False")
    with torch.device("meta"):
        model = LLM(config)
    dtype = dtype or sd.get("embed_tokens.weight", torch.empty(0)).dtype  # the checkpoint's (if absent: named below)
    sd = {k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    _load_checked(model, sd, source, fresh=("lm_head.weight",) * tied, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced embed_tokens' Parameter only
    return model


class HFTokenizer:
    """A local tokenizer.json via the optional `tokenizers` package, with WordTokenizer's calls. Special tokens are
    named by string (eos="<|im_end|>"); encode adds only what is asked."""

    def __init__(self, path: str, bos: Optional[str] = None, eos: Optional[str] = None, pad: Optional[str] = None,
                 audio: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from None
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.tok = Tokenizer.from_file(path)
        for role, name in (("bos", bos), ("eos", eos), ("pad", pad), ("audio", audio)):
            if name is not None and self.tok.token_to_id(name) is None:
                raise ValueError(f"{role} token {name!r} is not in the vocabulary of {path}")
        self.bos_id, self.eos_id, self.pad_id, self.audio_id = (
            None if name is None else self.tok.token_to_id(name) for name in (bos, eos, pad, audio))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError(f"bos={bos}, eos={eos} but no such token was named ({self.bos_id=}, {self.eos_id=})")
        return [self.bos_id] * bos + self.tok.encode(text, add_special_tokens=False).ids + [self.eos_id] * eos

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)
