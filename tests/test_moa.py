"""train_moa.py (all / ablate) and eval_moa.py against independent references: the
paper's trainable set and zero-init rule, MACs counted by torch's FLOP counter, fold rotation by hand,
test accuracy against one clip at a time, usage per class by hand, the cosine schedule by hand."""
import json
import math
import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import encoder as enc
import eval as E
import eval_moa
import loop
import synth
import train_moa

# A microscopic Soft-MoA configuration: pre-training and every method, in seconds.
MOA_MICRO = ["--bench_clips=100", "--pre_clips=100", "--pre_epochs=1", "--ast_d=16", "--ast_layers=2",
             "--ast_heads=2", "--ast_ff=32", "--epochs=1", "--batch=8", "--pre_batch=8"]
ALL_METHODS = "--methods=" + ",".join(train_moa.MOA_METHODS)


@pytest.fixture(scope="module")
def moa_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moa"))
    train_moa.main([f"--out_dir={out}", "--benchmarks=esc50,speechcommands", "--seeds=2", *MOA_MICRO, ALL_METHODS])
    return out


def _summary(path):
    with open(os.path.join(path, "summary.json")) as f:
        return json.load(f)


def test_moa_runs_every_method_and_prints_the_table(moa_run):
    table = open(os.path.join(moa_run, "moa.md")).read()
    for method in train_moa.MOA_METHODS:
        assert f"| {method} |" in table
        for bench in ("esc50", "speechcommands"):
            for seed in (0, 1):
                run = os.path.join(moa_run, bench, f"{method}-s{seed}")
                for f in ("best.pt", "last.pt", "metrics.jsonl", "summary.json", "eval.json"):
                    assert os.path.exists(os.path.join(run, f)), (run, f)
    assert "| esc50 | speechcommands |" in table.splitlines()[2]
    assert "share of its mixture's output" in table
    for row in ("| probe: mean log-mel (floor) |", "| probe: frozen AST |", "Share of the gap",
                "| soft-houlsby − dense-houlsby |"):
        assert row in table
    # A second call reuses every finished run (nothing rewritten); changed settings in the same folder are refused.
    stamps = {r: os.stat(os.path.join(r, "last.pt")).st_mtime_ns for r, _, fs in os.walk(moa_run) if "last.pt" in fs}
    train_moa.main([f"--out_dir={moa_run}", "--benchmarks=esc50,speechcommands", "--seeds=2",
                    "--evaluate=false", *MOA_MICRO, ALL_METHODS])
    assert len(stamps) == 8 * 2 * 2 + 1
    assert stamps == {r: os.stat(os.path.join(r, "last.pt")).st_mtime_ns for r in stamps}
    with pytest.raises(SystemExit, match="other settings"):
        train_moa.main([f"--out_dir={moa_run}", "--benchmarks=esc50", "--seeds=1", *MOA_MICRO, "--lr=1e-2"])


def test_fold_benchmarks_rotate_the_test_fold_with_the_seed():
    splits = [f"fold{i % 5 + 1}" for i in range(50)]
    for seed in range(7):
        roles = train_moa.fold_split(splits, seed)
        test, valid = f"fold{seed % 5 + 1}", f"fold{(seed + 1) % 5 + 1}"
        assert {splits[i] for i in roles["test"].tolist()} == {test}
        assert {splits[i] for i in roles["valid"].tolist()} == {valid}
        assert sorted(sum((v.tolist() for v in roles.values()), [])) == list(range(50))
    plain = ["train"] * 8 + ["valid", "test"]
    for seed in (0, 3):
        roles = train_moa.fold_split(plain, seed)
        assert roles["test"].tolist() == [9] and roles["valid"].tolist() == [8]
    with pytest.raises(SystemExit, match="no test clips"):
        train_moa.fold_split(["train", "valid"], 0)


def test_cosine_schedule_by_hand():
    s = loop.Schedule(steps=10, batch=1, lr=2.0, warmup=0, shape="cosine")
    assert loop.lr_at(0, s) == pytest.approx(2.0)
    assert loop.lr_at(5, s) == pytest.approx(1.0)
    assert loop.lr_at(9, s) == pytest.approx(1 + math.cos(math.pi * 0.9))


def _tiny_ast():
    cfg = dict(d=16, n_layers=2, n_heads=2, d_ff=32, num_mel_bins=32, max_length=60)
    torch.manual_seed(1)
    model = enc.AST(enc.ASTConfig(**cfg))
    return dict(config=cfg, model=model.state_dict(), mean=0.0, std=1.0)


@pytest.mark.parametrize("method", list(train_moa.MOA_METHODS))
def test_peft_model_trains_what_the_paper_trains_and_starts_as_the_frozen_ast(method):
    ast = _tiny_ast()
    model, trainable = train_moa.build_peft_model(ast, method, n_classes=5, frames=60, r=3, n_experts=4, slots=2)
    placement, kind = train_moa.MOA_METHODS[method]
    names = [k for k, _ in model.named_parameters()]
    if method == "full":
        want = set(names)
    elif method == "linear":
        want = {"head.fc.weight", "head.fc.bias"}
    else:   # the mixtures, the LayerNorm feeding each, the final LayerNorm, the head (paper Sec. 3)
        feeds = ("norm1",) if placement == "pfeiffer" else ("norm1", "norm2")
        want = {k for k in names if ".adapters." in k or k.startswith(("norm.", "head."))
                or any(f".{f}." in k for f in feeds)}
    assert set(trainable) == want
    assert {k for k, p in model.named_parameters() if p.requires_grad} == want
    # Zero-initialised up-projections: before training every method computes the frozen AST's features.
    plain = enc.AST(enc.ASTConfig(**ast["config"]))
    plain.load_state_dict(ast["model"])
    x = torch.randn(3, 60, 32)
    with torch.no_grad():
        got = model(x).pooled_mean
        ref = plain(x).pooled_mean
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _flops(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    return counter.get_total_flops(), out.tokens.shape[1]


def test_reported_adapter_macs_match_torchs_flop_counter(moa_run):
    # Each run's summary: its mixtures' multiply-adds on its clips, counted as the model's matmul FLOPs
    # minus the frozen AST's, / 2 per MAC, per token.
    ast = loop.load(os.path.join(moa_run, "ast", "ast.pt"))
    cache = loop.load(os.path.join(moa_run, "data", "esc50.pt"))
    x, C = cache["x"][:3].float(), len(cache["classes"])
    for method, (placement, kind) in train_moa.MOA_METHODS.items():
        s = _summary(os.path.join(moa_run, "esc50", f"{method}-s0"))
        r, n, p = (s["config"][k] for k in ("r", "n_experts", "slots"))
        plain, _ = _flops(train_moa.build_peft_model(ast, "linear", C, x.shape[1], r, n, p)[0], x)
        total, m = _flops(train_moa.build_peft_model(ast, method, C, x.shape[1], r, n, p)[0], x)
        assert m == s["tokens"]
        L, d = ast["config"]["n_layers"], ast["config"]["d"]
        mixtures = L * {"none": 0, "pfeiffer": 1, "houlsby": 2}[placement]
        bias_mix = mixtures * n * d if kind == "dense" else 0   # Dense-MoA's (n,) @ (n, d) bias mix: not in the paper's count
        assert (total - plain) / 2 / (x.shape[0] * m) == pytest.approx(s["macs_per_token"] + bias_mix), method


def test_usage_per_class_by_hand():
    # 3 clips, 2 adapters; clip 0 has a padded token (masked out), class 2 has no clip (NaN row).
    usage = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.3, 0.3]],
                          [[0.2, 0.8], [0.4, 0.6], [0.0, 1.0]],
                          [[0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]])
    mask = torch.tensor([[True, True, False], [True] * 3, [True] * 3])
    per_clip = eval_moa.usage_per_clip(usage, mask)
    torch.testing.assert_close(per_clip, torch.tensor([[0.75, 0.25], [0.2, 0.8], [0.8, 0.2]]))
    by_class = eval_moa.usage_by_class(per_clip, torch.tensor([1, 1, 0]), n_classes=3)
    torch.testing.assert_close(by_class[:2], torch.tensor([[0.8, 0.2], [0.475, 0.525]]))
    assert torch.isnan(by_class[2]).all()


def test_test_accuracy_matches_one_clip_at_a_time(moa_run):
    run = os.path.join(moa_run, "esc50", "soft-houlsby-s1")
    res = json.load(open(os.path.join(run, "eval.json")))
    s = _summary(run)
    ast = loop.load(os.path.join(moa_run, "ast", "ast.pt"))
    cache = loop.load(os.path.join(moa_run, "data", "esc50.pt"))
    test = train_moa.fold_split(cache["split"], 1)["test"]
    assert {cache["split"][i] for i in test.tolist()} == {"fold2"}
    model, _ = train_moa.build_peft_model(ast, "soft-houlsby", len(cache["classes"]), cache["x"].shape[1],
                                      s["config"]["r"], s["config"]["n_experts"], s["config"]["slots"])
    model.load_state_dict(loop.load(os.path.join(run, "best.pt")), strict=False)
    model.eval()
    hits = []
    for i in test.tolist():
        x = (cache["x"][i].float() - ast["mean"]) / (2 * ast["std"])
        with torch.no_grad():
            hits.append(int(model(x[None]).logits.argmax()) == int(cache["y"][i]))
    assert res["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert res["n_test"] == len(hits)
    # Soft-MoA usage rows: each class's tokens give each adapter a share; shares sum to 1.
    for name, rows in res["usage_by_class"].items():
        for row in rows:
            if row[0] == row[0]:                  # NaN: a class absent from the test fold
                assert sum(row) == pytest.approx(1.0, abs=1e-5)
    assert set(res["contribution"]) == {f"block{i}.{k}" for i in range(2) for k in ("attn", "ffn")}


def test_frozen_weights_are_not_in_the_checkpoints(moa_run):
    ast = loop.load(os.path.join(moa_run, "ast", "ast.pt"))
    best = loop.load(os.path.join(moa_run, "speechcommands", "soft-pfeiffer-s0", "best.pt"))
    frozen = [k for k in best if ".adapters." not in k
              and (k.startswith(("patch_embed", "pos_embed", "cls_token", "dist_token")) or ".attn." in k or ".mlp." in k)]
    assert not frozen
    assert all(k in ast["model"] or ".adapters." in k or k.startswith("head.") for k in best)


def test_ablation_keeps_the_parameter_budget(tmp_path, moa_run):
    out = str(tmp_path / "abl")
    os.makedirs(out)
    os.symlink(os.path.join(moa_run, "ast"), os.path.join(out, "ast"))         # reuse the pre-trained AST
    train_moa.main(["ablate", f"--out_dir={out}", "--ablate_benchmark=esc50", "--seeds=1",
                "--ablate_budget=12", "--ablate_experts=2,4", "--ablate_slots=1,3", *MOA_MICRO])
    rows = json.load(open(os.path.join(out, "ablation.json")))
    assert set(rows) == {"soft-pfeiffer | 2 | 6 | 1", "soft-pfeiffer | 4 | 3 | 1", "dense-pfeiffer | 2 | 6 | 1",
                         "dense-pfeiffer | 4 | 3 | 1", "soft-pfeiffer | 4 | 3 | 3"}
    # n adapters of r = budget / n: the same adapter parameters, whatever n (Soft-MoA adds d x n x p router).
    d, L = 16, 2
    for key, row in rows.items():
        kind, n, r, p = key.split(" | ")
        n, r, p = int(n), int(r), int(p)
        adapters = n * (d * r + r + r * d + d)
        router = d * n * p if kind.startswith("soft") else d * n + n
        assert row["params"] == [L * (adapters + router + 2 * d) + 2 * d], key   # + feeding and final LayerNorms


@pytest.mark.parametrize("argv, message", [
    (["--benchmarks=esc50,audioset"], "unknown benchmark 'audioset'"),
    (["--methods=soft,dense"], "unknown method 'soft'"),
    (["ablate", "--ablate_experts=5"], "do not divide ablate_budget=24"),
    (["--lora_rank=2"], "lora_rank"),
    (["--config=paper"], "pass --ast_checkpoint=PATH"),
    (["ablate", "--ablate_experts=0,2"], "ablate_experts must be comma-separated integers >= 1, got '0,2'"),
    (["ablate", "--ablate_slots=1,x"], "ablate_slots must be comma-separated integers >= 1"),
    (["ablate", "--ablate_slots=,"], "ablate_slots must be comma-separated integers >= 1"),
    (["nope"], "unknown command 'nope'; allowed: all, ablate"),
    (["moa"], "unknown command 'moa'"),
    (["--head_pool=max"], "unknown head_pool 'max'; allowed: mean, cls_dist, rows"),
])
def test_moa_cli_rejects_bad_options_by_name(argv, message):
    with pytest.raises(SystemExit, match=message):
        train_moa.parse_args(argv)


def _tone(freq, seconds=0.5, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _run_on_data_dir(root, out, moa_run):
    os.makedirs(out)
    os.symlink(os.path.join(moa_run, "ast"), os.path.join(out, "ast"))         # reuse the pre-trained AST
    train_moa.main([f"--out_dir={out}", f"--data_dir={root}", "--methods=soft-pfeiffer,linear", "--seeds=2",
                "--max_seconds=0.5", *MOA_MICRO])
    table = open(os.path.join(out, "moa.md")).read()
    assert "| soft-pfeiffer |" in table and "| linear |" in table
    return {seed: json.load(open(os.path.join(out, "data", f"soft-pfeiffer-s{seed}", "eval.json")))
            for seed in (0, 1)}


def test_moa_on_an_esc50_layout_cross_validates_over_its_folds(tmp_path, moa_run):
    # Fold k holds k + 1 clips per class, so the test-set size names the fold each seed tested on.
    root = tmp_path / "ESC-50"
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = []
    for fold in range(1, 6):
        for c, (category, freq) in enumerate((("dog", 300.0), ("rain", 2000.0))):
            for i in range(fold + 1):
                fn = f"{fold}-{category}-{i}.wav"
                data.write_wav(str(root / "audio" / fn), _tone(freq * (1 + 0.05 * i)), 16000)
                rows.append(f"{fn},{fold},{c},{category},False,{100 * fold + i},A\n")
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n" + "".join(rows))
    evals = _run_on_data_dir(str(root), str(tmp_path / "out"), moa_run)
    # seed 0 tests on fold1 (2 per class), seed 1 on fold2 (3 per class); valid is the next fold.
    assert evals[0]["n_test"] == 2 * 2 and evals[1]["n_test"] == 2 * 3
    assert set(evals[0]["per_class"]) == {"dog", "rain"}


def test_moa_on_a_folder_per_class_corpus_splits_by_file_name_hash(tmp_path, moa_run):
    root = tmp_path / "sounds"
    names = {}
    for c, freq in (("bell", 500.0), ("hum", 120.0), ("hiss", 3000.0)):
        (root / c).mkdir(parents=True)
        names[c] = [f"{c}{i}.wav" for i in range(12)]
        for i, fn in enumerate(names[c]):
            data.write_wav(str(root / c / fn), _tone(freq * (1 + 0.03 * i)), 16000)
    # Shorter than one 25 ms window: padded to one AST patch, not an error deep in training.
    data.write_wav(str(root / "bell" / "click.wav"), _tone(500.0, seconds=0.02), 16000)
    names["bell"].append("click.wav")
    # The split rule, by hand: crc32(file name) % 10 == 0 -> test, == 1 -> valid, else train.
    n_test = sum(zlib.crc32(fn.encode()) % 10 == 0 for fns in names.values() for fn in fns)
    assert n_test > 0
    evals = _run_on_data_dir(str(root), str(tmp_path / "out"), moa_run)
    assert evals[0]["n_test"] == evals[1]["n_test"] == n_test      # no folds: the split ignores the seed
    assert set(evals[0]["per_class"]) <= {"bell", "hum", "hiss"}


def _hf_ast_folder(path, max_length=64):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 max_length=max_length, num_mel_bins=32, num_labels=5)
    hf = transformers.ASTForAudioClassification(cfg).eval()
    with torch.no_grad():  # transformers initialises these to zero; random values test their wiring
        emb = hf.audio_spectrogram_transformer.embeddings
        for prm in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            prm.normal_()
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("method", ["soft-houlsby", "dense-pfeiffer", "linear"])
def test_a_real_ast_checkpoint_is_the_frozen_backbone(tmp_path, method):
    """--ast_checkpoint with a transformers AST: every method starts as that AST (zero-init
    up-projections), its AudioSet classifier dropped for the new head."""
    hf = _hf_ast_folder(tmp_path / "hub")
    cfg = train_moa.parse_args([f"--ast_checkpoint={tmp_path / 'hub'}", "--n_mels=32", *MOA_MICRO])[1]
    ast = train_moa.stage_ast(cfg, loop.Ctx(torch.device("cpu")), resume=False)
    assert (ast["mean"], ast["std"]) == (enc.AST_MEAN, enc.AST_STD)
    assert not any(k.startswith("head.") for k in ast["model"])
    model, trainable = train_moa.build_peft_model(ast, method, n_classes=3, frames=64, r=2, n_experts=3, slots=1)
    assert trainable and all(k.startswith("head.") or ".adapters." in k or "norm" in k for k in trainable)
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        ref = hf.audio_spectrogram_transformer(x).last_hidden_state
        torch.testing.assert_close(model.eval()(x).tokens, ref, rtol=0, atol=1e-5)


def test_moa_with_a_real_ast_checkpoint_skips_pre_training(tmp_path):
    _hf_ast_folder(tmp_path / "hub")
    out = tmp_path / "out"
    # Speech-Commands-like clips are 1 s (98 frames), longer than the checkpoint's 64: its
    # position table is resized, as load_ast does for AST-Base on other clip lengths.
    train_moa.main([f"--out_dir={out}", f"--ast_checkpoint={tmp_path / 'hub'}", "--n_mels=32",
                "--benchmarks=speechcommands", "--methods=soft-pfeiffer", "--seeds=1", "--probes=false", *MOA_MICRO])
    assert not (out / "ast").exists() and not (out / "speechcommands" / "probe-s0.json").exists()
    run = out / "speechcommands" / "soft-pfeiffer-s0"
    scored = json.load(open(run / "eval.json"))
    assert scored["n_test"] > 0
    # eval_moa.py knows the folder by its config.json (there is no ast/), also from a run inside it;
    # eval.py sends it there.
    for path in (out, run):
        os.remove(run / "eval.json")
        eval_moa.main([str(path)])
        assert json.load(open(run / "eval.json"))["accuracy"] == scored["accuracy"]
    with pytest.raises(SystemExit, match="score it with python eval_moa.py"):
        E.main([str(run)])
    with pytest.raises(SystemExit, match="nope: not a train_moa.py folder"):
        eval_moa.main([str(tmp_path / "nope")])
    paper = train_moa.parse_args(["--config=paper", f"--ast_checkpoint={tmp_path / 'hub'}"])[1]
    assert (paper.n_mels, paper.r, paper.n_experts, paper.slots, paper.head_pool) == (128, 6, 7, 1, "mean")   # papers.md
    with pytest.raises(SystemExit, match="takes 32 mel bins but --n_mels=16; set --n_mels=32"):
        train_moa.main([f"--out_dir={tmp_path / 'out2'}", f"--ast_checkpoint={tmp_path / 'hub'}", "--n_mels=16",
                    "--benchmarks=speechcommands", *MOA_MICRO])


def test_ast_checkpoint_errors_name_the_file_and_the_fix(tmp_path, moa_run):
    ctx = loop.Ctx(torch.device("cpu"))
    ours = os.path.join(moa_run, "ast", "ast.pt")                # our own pre-trained AST, 64 mel bins
    cfg = train_moa.parse_args([f"--ast_checkpoint={ours}"])[1]
    assert train_moa.stage_ast(cfg, ctx, resume=False)["config"]["num_mel_bins"] == 64
    cfg = train_moa.parse_args([f"--ast_checkpoint={ours}", "--n_mels=128"])[1]
    with pytest.raises(SystemExit, match=r"ast.pt: the AST takes 64 mel bins but --n_mels=128; set --n_mels=64"):
        train_moa.stage_ast(cfg, ctx, resume=False)
    cfg = train_moa.parse_args([f"--ast_checkpoint={tmp_path / 'nope.pt'}"])[1]
    with pytest.raises(SystemExit, match=r"--ast_checkpoint=.*nope.pt: no such file or folder"):
        loop.check_inputs(cfg, ("ast_checkpoint",), cfg.data_label)          # main() calls it before any work


def test_pooled_rows_by_hand():
    # Fp = 3 rows of Tp = 4 columns; clip 1 has 2 real columns. Each row: the mean over its real columns.
    torch.manual_seed(0)
    h, real = torch.randn(2, 2 + 3 * 4, 5), torch.ones(2, 2 + 3 * 4, dtype=torch.bool)
    real[1, 2:] = torch.tensor([True, True, False, False] * 3)
    want = torch.stack([torch.cat([h[b, [2 + f * 4 + t for t in range(4 if b == 0 else 2)]].mean(0) for f in range(3)])
                        for b in range(2)])
    torch.testing.assert_close(enc.pooled_rows(h, real, 3), want)
    # The "rows" head reads exactly that of the output tokens, the mask derived from the frames.
    model = enc.AST(enc.ASTConfig(d=8, n_layers=1, n_heads=2, d_ff=16, num_mel_bins=32, max_length=60, n_classes=3,
                                  head_pool="rows"))
    x, mask = torch.randn(2, 60, 32), torch.arange(60)[None] < torch.tensor([[60], [40]])
    out = model(x, mask)
    assert model.head.fc.in_features == 8 * model.cfg.grid[0] == 16
    torch.testing.assert_close(out.logits, model.head(enc.pooled_rows(out.tokens, out.mask, 2)))
    alone = model(x[1:, :40])                          # a padded clip scores as if alone
    torch.testing.assert_close(out.logits[1:], alone.logits, rtol=1e-4, atol=1e-5)


def test_frozen_features_and_the_floor_against_a_block_by_block_loop():
    ast = _tiny_ast()
    cache = dict(x=torch.randn(3, 60, 32).half(), frames=torch.tensor([60, 45, 30]), y=torch.tensor([0, 1, 0]))
    feats = train_moa.frozen_features(ast, cache, loop.Ctx(torch.device("cpu")), chunk=2)
    model = enc.AST(enc.ASTConfig(**ast["config"]))
    model.load_state_dict(ast["model"])
    fp = model.cfg.grid[0]
    for i, n in enumerate(cache["frames"].tolist()):            # one clip alone, cropped to its frames
        x = cache["x"][i:i + 1, :n].float() / 2                   # AST's norm: (x - mean) / (2 std)
        tp = (n - 16) // 10 + 1
        h = torch.cat([model.cls_token + model.pos_embed[:, :1], model.dist_token + model.pos_embed[:, 1:2],
                       model.patch_embed(x.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2)
                       + model.pos_embed[:, 2:].reshape(1, fp, -1, 16)[:, :, :tp].reshape(1, fp * tp, 16)], 1)
        want = []
        with torch.no_grad():
            for blk in model.blocks:
                h = blk(h)[0]
                want.append(h[0, 2:].reshape(fp, tp, 16).mean(1).flatten())
            want.append(model.norm(h)[0, 2:].reshape(fp, tp, 16).mean(1).flatten())
        torch.testing.assert_close(feats[i], torch.cat(want), rtol=1e-4, atol=1e-5)
    floor = train_moa.mean_logmel(cache)
    for i, n in enumerate(cache["frames"].tolist()):
        torch.testing.assert_close(floor[i], cache["x"][i, :n].float().mean(0))


def test_probes_choose_l2_on_validation_and_score_test(tmp_path, monkeypatch):
    ast, g = _tiny_ast(), torch.Generator().manual_seed(0)
    splits = [f"fold{i % 5 + 1}" for i in range(100)]
    y = torch.arange(100) % 2
    x = torch.randn(100, 60, 32, generator=g) + y[:, None, None] * torch.linspace(-1, 1, 32)   # a learnable tilt
    cache, seen = dict(x=x.half(), frames=torch.full((100,), 60), y=y, split=splits, classes=["a", "b"]), []
    cfg = train_moa.MoAConfig(out_dir=str(tmp_path), seeds=2)
    fit = data.probe_fit
    def spy(train, n_classes, l2):
        seen.append((len(train[1]), train[0].shape[1], l2))
        return fit(train, n_classes, l2)
    monkeypatch.setattr(data, "probe_fit", spy)
    train_moa.probe_runs(cfg, ast, loop.Ctx(torch.device("cpu")), cache, "esc50")
    # per seed: every l2 on the frozen features (2 blocks + final norm, 2 rows of d 16), then on the mean log-mel
    assert seen == ([(60, 3 * 2 * 16, l2) for l2 in train_moa.PROBE_L2] + [(60, 32, l2) for l2 in train_moa.PROBE_L2]) * 2
    for seed in (0, 1):
        r = json.load(open(tmp_path / "esc50" / f"probe-s{seed}.json"))
        roles = train_moa.fold_split(splits, seed)
        feats = train_moa.mean_logmel(cache)
        valid = {l2: data.probe_accuracy((feats[roles["train"]], y[roles["train"]]), (feats[roles["valid"]], y[roles["valid"]]),
                                         2, l2) for l2 in train_moa.PROBE_L2}
        assert r["log_mel"]["valid"] == max(valid.values()) and valid[r["log_mel"]["l2"]] == max(valid.values())
        assert r["log_mel"]["test"] == data.probe_accuracy((feats[roles["train"]], y[roles["train"]]),
                                                           (feats[roles["test"]], y[roles["test"]]), 2, r["log_mel"]["l2"])
        assert r["frozen"]["width"] == 3 * 2 * 16 and r["log_mel"]["width"] == 32


def test_pre_training_targets_are_the_tags_and_the_phonemes_of_the_spoken_word(tmp_path):
    cfg = train_moa.MoAConfig(out_dir=str(tmp_path), pre_clips=40)
    cache = train_moa.fbank_cache(cfg, loop.Ctx(torch.device("cpu")), "audioset")
    src = synth.SyntheticCorpus(synth.CorpusConfig.audioset_like(n_clips=40, clip_seconds=2.5))
    phones = [f"phone:{p}" for p in (*synth.PHONEMES, *synth.DIPHTHONGS)]
    assert cache["classes"] == list(synth.AUDIOSET_TAGS) + phones
    spoken = 0
    for j in range(40):
        labels = src.labels(j)
        on = {c for c, v in zip(cache["classes"], cache["y"][j].tolist()) if v}
        phones = {"phone:" + p for p in synth.WORDS[labels["word"]].split()} if "word" in labels else set()
        assert on == set(synth.audioset_tags(labels)) | phones
        spoken += bool(phones)
    assert spoken > 10
    plain = train_moa.fbank_cache(train_moa.MoAConfig(out_dir=str(tmp_path / "tags"), pre_clips=40, pre_phones=False),
                                  loop.Ctx(torch.device("cpu")), "audioset")
    assert plain["classes"] == list(synth.AUDIOSET_TAGS) and torch.equal(plain["y"], cache["y"][:, :len(synth.AUDIOSET_TAGS)])
    assert {"phone:y", "phone:eh", "phone:s"} <= set(cache["classes"])          # "yes: y eh s"


def test_gap_shares_and_paired_differences_by_hand():
    acc = {"linear": (0.5, 0.6), "full": (0.9, 0.8), "single-pfeiffer": (0.6, 0.7), "soft-pfeiffer": (0.8, 0.7)}
    results = [dict(method=m, bench="esc50", seed=s, accuracy=a[s]) for m, a in acc.items() for s in (0, 1)]
    table = {}
    text = eval_moa.gap_tables(results, ["esc50"], table)
    # (method - linear) / (full - linear) of the means: (0.65 - 0.55) / 0.30 and (0.75 - 0.55) / 0.30
    assert table["gap_share"]["single-pfeiffer"]["esc50"] == pytest.approx(1 / 3)
    assert table["gap_share"]["soft-pfeiffer"]["esc50"] == pytest.approx(2 / 3)
    d = table["paired"]["soft-pfeiffer − single-pfeiffer"]["esc50"]             # differences 0.2 and 0.0
    assert d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(0.02 ** 0.5) and d["wins"] == 1
    assert "| single-pfeiffer | 0.33 |" in text and "| soft-pfeiffer − single-pfeiffer | +0.100 ± 0.141 (1/2) |" in text
    assert "dense" not in text                                                    # no Dense-MoA run, no pair


def test_a_moved_run_folder_still_evaluates(tmp_path, moa_run):
    moved = shutil.copytree(moa_run, tmp_path / "moved")           # config.json still names the old out_dir
    os.remove(moved / "esc50" / "linear-s0" / "eval.json")
    shutil.rmtree(moved / "data")                                    # made again from the moved folder's settings
    eval_moa.main([str(moved), "--runs=esc50/linear-s0"])
    assert json.load(open(moved / "esc50" / "linear-s0" / "eval.json")) == \
        json.load(open(os.path.join(moa_run, "esc50", "linear-s0", "eval.json")))
    assert os.path.exists(moved / "data" / "esc50.pt")               # the moved folder's, not the original's
