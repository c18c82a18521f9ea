"""train.py and pretrain.py: the whole pipeline at a microscopic size, data parallelism against one process,
resume against an uninterrupted run, the schedule, the data order, the CLI."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import loop
import pretrain
import train
from conftest import MICRO, ROOT
from moe_adapter import MoEAdapter, MoEAdapterConfig, load_balancing_loss


def test_whole_pipeline_prints_the_comparison_and_reuses_finished_stages(tmp_path, capfd):
    out = str(tmp_path / "run")
    train.main(["all", f"--out_dir={out}", "--seeds=2", *MICRO])
    text = capfd.readouterr().out                    # the comparison comes from eval.py's process
    for kind in ("moe", "dense-flops", "dense-params"):
        assert f"| {kind} | 2 |" in text
        for seed in (0, 1):
            run = os.path.join(out, f"{kind}-s{seed}")
            for f in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "eval.json",
                      "align/best.pt", "align/metrics.jsonl"):
                assert os.path.exists(os.path.join(run, f)), f
    for f in ("mel.pt", "features.pt", "encoder/encoder.pt", "llm/llm.pt", "comparison.md", "comparison.json",
              "floors.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert "params" in text and "active" in text and "MFLOPs/token" in text
    table = json.load(open(os.path.join(out, "comparison.json")))
    assert table["kinds"]["moe"]["seeds"] == [0, 1] and len(table["kinds"]["moe"]["all_closed"]) == 2
    for name in ("chance", "probe: log-mel", "probe: encoder", "text ceiling"):
        assert f"| {name} |" in text
    assert table["paired"]["moe - dense-flops"]["all"]["n"] == 2
    # A second call reuses every finished stage; other settings in the same folder are refused.
    train.main(["all", f"--out_dir={out}", "--seeds=2", "--evaluate=false", *MICRO])
    assert "finished earlier, reusing" in capfd.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        train.main(["adapter", f"--out_dir={out}", *MICRO, "--llm_steps=7"])


def _tensors(path, key):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    ck = ck.get(key, ck) if key else ck
    return ck


def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo): every stage ends with the weights of a single process."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(["adapter", f"--out_dir={one}", *MICRO])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "adapter", f"--out_dir={two}", *MICRO]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    for rel, key in (("encoder/encoder.pt", "model"), ("llm/llm.pt", "model")):
        a, b = _tensors(os.path.join(one, rel), key), _tensors(os.path.join(two, rel), key)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{rel} {k}")
    a = _tensors(os.path.join(one, "moe-s0", "last.pt"), "model")["adapter"]
    b = _tensors(os.path.join(two, "moe-s0", "last.pt"), "model")["adapter"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(a["router.weight"], MoEAdapter(MoEAdapterConfig(
        d_in=16, d_out=32, d_expert=8, d_shared=16)).router.weight)   # it did train


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.main(["adapter", f"--out_dir={full}", *MICRO])
    os.makedirs(cut)
    for f in ("mel.pt", "config.json"):
        shutil.copy(os.path.join(full, f), cut)
    for d in ("encoder", "llm"):
        shutil.copytree(os.path.join(full, d), os.path.join(cut, d))
    real_lr_at = loop.lr_at

    def crash_at_4(step, s):
        if step == 4 and s.steps == 6 and s.batch == 8:
            raise KeyboardInterrupt("simulated crash")
        return real_lr_at(step, s)
    monkeypatch.setattr(loop, "lr_at", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(["adapter", f"--out_dir={cut}", *MICRO])
    assert _tensors(os.path.join(cut, "moe-s0", "last.pt"), None)["step"] == 3     # the last checkpoint
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    # A partial run continues only with the settings it was started with.
    with pytest.raises(SystemExit, match=r"partial moe s0 (align )?run made with other settings \(lr: "):
        train.main(["adapter", "--resume", f"--out_dir={cut}", *MICRO, "--lr=0.5"])
    train.main(["adapter", "--resume", f"--out_dir={cut}", *MICRO])
    for part in ("adapter", "llm"):                  # the LLM is fine-tuned in 3b: it resumes too
        a = _tensors(os.path.join(full, "moe-s0", "last.pt"), "model")[part]
        b = _tensors(os.path.join(cut, "moe-s0", "last.pt"), "model")[part]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # Step 4 was logged before the crash and trained again: one record per step. The last record's
    # time per step covers all 6 steps, the 3 before the resume too.
    records = [json.loads(line) for line in open(os.path.join(cut, "moe-s0", "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    summary = json.load(open(os.path.join(cut, "moe-s0", "summary.json")))
    assert records[-1]["ms_per_step"] == pytest.approx(1e3 * summary["seconds"] / 6)


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_each_run_of_all_starts_from_the_pretrained_llm_as_when_run_alone(tmp_path, tune):
    """`all` trains its runs in one process: the second run must not start from the LLM the first tuned."""
    both, alone = str(tmp_path / "both"), str(tmp_path / "alone")
    flags = [f"--tune_llm={tune}", "--lora_rank=2", *MICRO]
    train.main(["all", f"--out_dir={both}", "--adapters=moe", "--seeds=2", "--evaluate=false", *flags])
    os.makedirs(alone)
    shutil.copy(os.path.join(both, "mel.pt"), alone)
    for d in ("encoder", "llm"):
        shutil.copytree(os.path.join(both, d), os.path.join(alone, d))
    train.main(["adapter", f"--out_dir={alone}", "--seed=1", *flags])
    a = _tensors(os.path.join(both, "moe-s1", "last.pt"), "model")
    b = _tensors(os.path.join(alone, "moe-s1", "last.pt"), "model")
    part = "llm" if tune == "full" else "lora"
    assert a[part].keys() == b[part].keys()
    if tune == "lora":
        assert len(a["lora"]) == 4                                             # q and v of the one layer
    for p in ("adapter", part):
        for k in a[p]:
            torch.testing.assert_close(a[p][k], b[p][k], rtol=0, atol=1e-6, msg=f"{p} {k}")


def test_controls_run_each_setting_and_tabulate_the_paired_margins(tmp_path, capfd):
    """heterogeneity: speech alone vs the main run; capacity: other expert widths on the main run's
    encoder, LLM and caches. Each setting is a whole `all` with its own comparison."""
    out = str(tmp_path / "run")
    flags = [f"--out_dir={out}", "--seeds=2", "--adapters=moe,dense-flops", *MICRO]
    train.main(["capacity", "--widths=0.5", *flags])
    text = capfd.readouterr().out
    sub = os.path.join(out, "width-x0.5")
    assert json.load(open(os.path.join(sub, "config.json")))["d_expert"] == 4             # 8 x 0.5
    assert os.path.samefile(os.path.join(out, "mel.pt"), os.path.join(sub, "mel.pt"))   # shared, not recomputed
    assert not os.path.exists(os.path.join(sub, "encoder"))                            # the main run's encoder
    assert "| main run (d_expert 8) | dense-flops | 2 |" in text and "| experts x0.5 (d_expert 4) | moe | 2 |" in text
    main = json.load(open(os.path.join(out, "comparison.json")))["paired"]["moe - dense-flops"]["semantic"]
    assert f"{main['mean']:+.3f} ± {main['std']:.3f} ({main['wins']}/2)" in text
    train.main(["heterogeneity", *flags])
    text = capfd.readouterr().out
    speech = json.load(open(os.path.join(out, "speech", "floors.json")))
    assert set(speech["chance"]["tasks"]) <= {"word", "pitch_group", "tract_group", "emotion", "rate"}
    assert "| speech only (d_expert 8) | moe | 2 |" in text and os.path.exists(os.path.join(out, "heterogeneity.md"))


def test_lr_schedule_warmup_stable_decay_by_hand():
    s = loop.Schedule(steps=100, batch=1, lr=1.0, warmup=10, decay_frac=0.2)
    assert loop.lr_at(0, s) == pytest.approx(0.1)            # (0 + 1) / 10
    assert loop.lr_at(9, s) == pytest.approx(1.0)
    assert loop.lr_at(50, s) == 1.0
    assert loop.lr_at(80, s) == pytest.approx(1.0)           # decay starts at step 80
    assert loop.lr_at(90, s) == pytest.approx(0.5)
    assert loop.lr_at(99, s) == pytest.approx(0.05)


def test_batch_order_epochs_are_permutations_and_ranks_split_the_global_batch():
    one = loop.Ctx(torch.device("cpu"))
    n, G = 20, 4
    epoch = torch.cat([loop.batch_indices(s, n, G, 0, one) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(n))                     # each item once per epoch
    nxt = torch.cat([loop.batch_indices(s, n, G, 0, one) for s in range(5, 10)])
    assert sorted(nxt.tolist()) == list(range(n)) and not torch.equal(epoch, nxt)
    for step in (0, 7):
        ranks = [loop.batch_indices(step, n, G, 0, loop.Ctx(torch.device("cpu"), r, 2)) for r in (0, 1)]
        assert torch.equal(torch.cat(ranks), loop.batch_indices(step, n, G, 0, one))


def test_global_balance_loss_in_one_process_is_eq4():
    torch.manual_seed(1)
    moe = MoEAdapter(MoEAdapterConfig(d_in=8, d_out=8, stack=2, n_experts=4, top_k=2, d_expert=8))
    x, mask = torch.randn(3, 10, 8), torch.arange(10)[None, :] < torch.tensor([[10], [6], [4]])
    _, aux = moe(x, mask)
    h = moe.norm_in(torch.cat([x[b, :int(mask[b].sum())].reshape(-1, 16) for b in range(3)]))
    probs = moe.router(h).softmax(-1)                                     # the 5 + 3 + 2 real tokens
    ref = load_balancing_loss(probs, probs.topk(2, -1).indices)
    got = train.balance_loss(aux, loop.Ctx(torch.device("cpu")))
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got, moe.router.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, moe.router.weight)[0]
    torch.testing.assert_close(g1, g2)


def test_text_documents_state_the_answer_before_the_question():
    choices = {"word": ["yes", "no"], "emotion": ["happy", "sad", "angry"], "rate": ["slow", "fast"]}
    captions = 0
    for i in range(60):
        ctx_text, answer = pretrain.text_document(np.random.default_rng(i), choices, 3)
        facts, question = ctx_text.split(". ", 1)
        if question == pretrain.CAPTION:             # every stated fact, in data.TASKS order
            captions += 1
            told = facts.split()
            assert answer.split() == sorted(told, key=lambda w: next(list(data.TASKS).index(t)
                                                                      for t, c in choices.items() if w in c))
            continue
        asked = next(t for t, task in data.TASKS.items() if question in task.questions)
        assert answer in choices[asked] and answer in facts.split()
    assert 0.15 < captions / 60 < 0.45                # CAPTION_SHARE = 0.3
    assert pretrain.text_document(np.random.default_rng(4), choices, 3) == pretrain.text_document(
        np.random.default_rng(4), choices, 3)         # a pure function of the generator


def test_caption_items_state_every_label_of_a_clip_in_task_order():
    items = [dict(index=7, task="rate", answer="fast"), dict(index=7, task="word", answer="yes"),
             dict(index=9, task="sound", answer="dog"), dict(index=7, task="emotion", answer="sad")]
    got = {c["index"]: c["answer"] for c in train.caption_items(items)}
    assert got == {7: "yes sad fast", 9: "dog"}                     # word, emotion, rate: TASKS order


def test_folder_per_class_data_is_split_by_file_name(tmp_path):
    for c in ("dog", "rain"):
        os.makedirs(tmp_path / c)
        for i in range(30):
            data.write_wav(str(tmp_path / c / f"{c}{i}.wav"), np.zeros(1600, np.float32))
    srcs = train.sources(train.TrainConfig(data_dir=str(tmp_path), data_label="event"))
    sizes = {s: len(src) for s, src in srcs.items()}
    assert sum(sizes.values()) == 60 and sizes["train"] > sizes["valid"] > 0 and sizes["test"] > 0
    names = {s: {os.path.basename(r.source) for r in src.records} for s, src in srcs.items()}
    assert not names["train"] & names["test"]
    items = train.instruction_items(train.TrainConfig(), srcs)
    assert {it["task"] for it in items["train"]} == {"sound"} and items["test"][0]["choices"] == ["dog", "rain"]
    with pytest.raises(SystemExit, match="names no task label"):
        train.sources(train.TrainConfig(data_dir=str(tmp_path), data_label="colour"))


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "did you mean --steps"),
    (["--steps=three"], "--steps takes a value of type int"),
    (["steps=3"], "unknown command 'steps=3'"),
    (["moa"], "unknown command 'moa'"),                    # train_moa.py now
    (["--config=huge"], "unknown config 'huge'"),
    (["--adapters=moe,sparse"], "unknown adapter 'sparse'"),
    (["--top_k=9"], "top_k must be in"),                   # MoEAdapterConfig's own check
    (["--tune_llm=half"], "tune_llm must be full, lora or frozen"),
    (["capacity", "--widths=2,x"], "widths must be comma-separated factors"),
    (["--domains=music"], "domains must be all or speech"),
])
def test_cli_rejects_bad_options_by_name(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(argv)


def test_training_scripts_never_import_the_evaluation_ones():
    """loop <- pretrain <- train, train_moa <- eval, eval_moa: train.py and train_moa.py run the
    evaluation in its own process (loop.run_script), lazy imports included; pretrain never imports train."""
    from importscan import imported_packages
    ours = {"loop", "pretrain", "train", "train_moa", "eval", "eval_moa"}
    deps = {f: imported_packages(os.path.join(ROOT, f + ".py")) & ours for f in ours}
    assert deps == {"loop": set(), "pretrain": {"loop"}, "train": {"loop", "pretrain"}, "train_moa": {"loop"},
                    "eval": {"loop", "pretrain", "train"}, "eval_moa": {"loop", "train_moa", "eval"}}


def test_presets_resolve():
    ckpts = ["--encoder_checkpoint=whisper", "--llm_checkpoint=qwen"]       # paper needs both
    for name in train.PRESETS:
        cmd, cfg, resume = train.parse_args(["adapter", f"--config={name}", "--resume", "--seed=2", *ckpts])
        assert cmd == "adapter" and resume and cfg.seed == 2
    assert train.parse_args(["--config=paper", *ckpts])[1].stack == 2


# ----------------------------------------------------------------------------------------------
# The live-encoder path (--cache_features=false)


def test_live_features_equal_a_hand_computation_and_the_cache_up_to_its_fp16_mels(tmp_path):
    import encoder as enc
    cfg = train.parse_args(["adapter", f"--out_dir={tmp_path}", *MICRO])[1]
    ctx = loop.Ctx(torch.device("cpu"))
    srcs = train.sources(cfg)
    torch.manual_seed(0)
    ecfg = enc.WhisperEncoderConfig(n_mels=cfg.n_mels, d=cfg.enc_d, n_layers=cfg.enc_layers, n_heads=cfg.enc_heads,
                                    d_ff=cfg.enc_ff)
    encoder = enc.WhisperEncoder(ecfg).eval()                         # random weights: the path is under test
    live_mels = train.live_mels(srcs["test"], cfg)
    live = train.live_features(encoder, live_mels, ctx, chunk=2)            # 3 clips: two chunks
    cached_mels = train.mel_cache(cfg, srcs, ctx)["test"]
    cached_x, cached_m = train.live_features(encoder, cached_mels, ctx, 256)(torch.arange(len(cached_mels)), "cpu")
    assert live_mels.domain == cached_mels.domain                   # from labels, no rendering
    j = torch.tensor([3, 0, 3, len(live_mels) - 1])                # a repeated clip, out of order
    got_x, got_m = live(j, "cpu")
    for b, i in enumerate(j.tolist()):
        audio = torch.from_numpy(srcs["test"][i].audio)[None]        # (1, n): the clip, rendered alone
        mel, real = enc.whisper_log_mel(audio, n_mels=cfg.n_mels, n_frames=round(cfg.clip_seconds * 100))
        with torch.no_grad():
            ref = encoder(mel, real)
            ref16 = encoder(mel.half().float(), real)               # what mel.pt holds
        assert torch.equal(got_m[b], ref.mask[0]) and torch.equal(cached_m[i], ref.mask[0])
        # Same float32 arithmetic, other batch shapes: only summation order differs.
        torch.testing.assert_close(got_x[b], ref.features[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached_x[i], ref16.features[0], rtol=0, atol=1e-5)
        # Live vs cache: the cache rounds the log-mels (here |x| < 2) to fp16, an error of at most
        # 2^-11 = 4.9e-4 per input value. Through this encoder that moved features (unit scale
        # after the LayerNorm) by at most 1.3e-4 over the whole test split when measured; 5e-3
        # leaves room for other seeds and still fails a real mismatch: another clip, or a frame
        # shifted by one, differs by 0.5 to 1.7.
        torch.testing.assert_close(got_x[b], cached_x[i], rtol=0, atol=5e-3)


def test_live_encoder_pipeline_runs_end_to_end_and_writes_no_cache(tmp_path, capfd):
    out = str(tmp_path / "live")
    train.main(["all", f"--out_dir={out}", "--cache_features=false", "--seeds=1", "--adapters=moe", *MICRO])
    text = capfd.readouterr().out
    assert "| moe | 1 |" in text and "eval moe-s0:" in text
    for f in ("config.json", "encoder/encoder.pt", "llm/llm.pt", "moe-s0/best.pt", "moe-s0/eval.json",
              "comparison.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "mel.pt")) and not os.path.exists(os.path.join(out, "features.pt"))
    saved = json.load(open(os.path.join(out, "moe-s0", "eval.json")))
    assert set(saved["expert_usage"]["domain"]) <= {"speech", "music", "environment", "mixture", "scene"}


def test_paper_config_names_the_missing_checkpoints_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--config=paper runs on the real checkpoints"):
        train.main(["adapter", "--config=paper", f"--out_dir={tmp_path}"])
    missing = str(tmp_path / "whisper-large-v3")
    with pytest.raises(SystemExit, match=f"--encoder_checkpoint={missing}: no such file or folder"):
        train.main(["adapter", "--config=paper", f"--out_dir={tmp_path}", "--n_clips=40", "--workers=0",
                    f"--encoder_checkpoint={missing}", f"--llm_checkpoint={tmp_path / 'qwen3'}"])
    assert os.listdir(tmp_path) == []                  # refused at start-up: nothing written


# ----------------------------------------------------------------------------------------------
# A Hugging Face LLM checkpoint (--llm_checkpoint=DIR): config.json, safetensors, tokenizer.json


def tiny_hf_llm(folder, texts):
    """A random 1-layer Qwen3 saved by transformers, and a word-level tokenizer.json (tokenizers)
    whose vocabulary holds every word of `texts`. Qwen's special-token layout: no BOS, EOS doubles
    as padding, an added audio placeholder token named by config.json's audio_token_id."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    pre = tokenizers.pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    specials = ["<unk>", "<|endoftext|>", "<|AUDIO|>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    tok.save(os.path.join(folder, "tokenizer.json"))
    eos, audio = vocab["<|endoftext|>"], vocab["<|AUDIO|>"]
    config = transformers.Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**saved, "audio_token_id": audio}, f)
    return tok, eos, audio


def test_adapter_trains_and_evaluates_on_a_hugging_face_llm_folder(tmp_path, capsys):
    import eval as E
    hf_dir, out = str(tmp_path / "qwen3-tiny"), str(tmp_path / "run")
    os.makedirs(hf_dir)
    cfg = train.parse_args(["adapter", f"--out_dir={out}", *MICRO])[1]
    items = train.instruction_items(cfg, train.sources(cfg))
    texts = [it["question"] + " " + it["answer"] for split in items.values() for it in split]
    ref_tok, eos, audio = tiny_hf_llm(hf_dir, texts)
    train.main(["adapter", f"--out_dir={out}", f"--llm_checkpoint={hf_dir}", *MICRO])
    assert "moe s0 step     6" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "llm"))                    # no LLM pre-training
    summary = json.load(open(os.path.join(out, "moe-s0", "summary.json")))
    assert summary["steps"] == 6 and math.isfinite(summary["best_valid"])
    # eval.py finds the same checkpoint from the run's config.json, with the tokenizer's own ids.
    parts = E.load_parts(out, loop.Ctx(torch.device("cpu")))
    tok, llm_cfg = parts["tok"], parts["llm"].cfg
    assert (llm_cfg.bos_id, llm_cfg.eos_id, llm_cfg.audio_token_id) == (None, eos, audio)
    it = parts["test"].items[0]
    assert tok.encode(it["question"]) == ref_tok.encode(it["question"], add_special_tokens=False).ids
    assert 0 not in tok.encode(it["question"]) + tok.encode(it["answer"])     # no <unk>: the vocabulary covers the task
    res = E.evaluate_run(os.path.join(out, "moe-s0"), parts=parts, ctx=loop.Ctx(torch.device("cpu")))
    assert set(res["tasks"]) == {it["task"] for it in parts["test"].items}       # every test task scored
    # Training labels end every answer with the checkpoint's EOS (build_batch's layout).
    _, _, prompts, answers = parts["train"].batch(torch.arange(2), "cpu")
    b = train.lm.build_batch(prompts, answers, [3, 3], cfg=llm_cfg)
    last = b["labels"][0][b["labels"][0] != train.lm.IGNORE_INDEX][-1]
    assert int(last) == eos
