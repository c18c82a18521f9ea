"""train.py (the demo for now): runs end to end at a microscopic size; the CLI is strict."""
import pytest

import train


def test_demo_runs_and_prints_the_table(capsys):
    train.main(["--steps=3", "--seeds=2", "--batch=4", "--eval_sequences=8", "--log_every=3"])
    out = capsys.readouterr().out
    for kind in ("moe", "dense-params", "dense-flops"):
        assert f"| {kind} |" in out


def test_lr_schedule_warmup_stable_decay_by_hand():
    cfg = train.DemoConfig(steps=100, warmup=10, decay_frac=0.2, lr=1.0)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)            # (0 + 1) / 10
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(50, cfg) == 1.0
    assert train.lr_at(80, cfg) == pytest.approx(1.0)           # decay starts at step 80
    assert train.lr_at(90, cfg) == pytest.approx(0.5)
    assert train.lr_at(99, cfg) == pytest.approx(0.05)


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "did you mean --steps"),
    (["--steps=three"], "--steps takes a value of type int"),
    (["steps=3"], "expected --key=value"),
    (["--adapters=moe,sparse"], "unknown adapter 'sparse'"),
])
def test_cli_rejects_bad_options_by_name(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(argv)
