"""`ftl sweep`: a grid to a correct summary and best config, random search ranges and seeds, successive
halving, bad input. Trials run in this process through the real CLI entry point and Trainer."""

import csv

import pytest

from engine import cli
from engine.commands import sweep
from engine.config import load_config
from tests.conftest import check, read_metrics, run_ftl, tiny_overrides


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """One BPE tokenizer for every trial (each trial would otherwise train its own)."""
    from engine.data import sources as data
    from engine.config import DataConfig

    raw = data.load_raw(DataConfig(), seed=0)
    tok = data.train_bpe(data.text_iterator(raw["train"], "text"), 512)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def sweep_cmd(out, tokenizer_dir, *args, **extra) -> list[str]:
    sets = tiny_overrides(out / "unused", **{"data.tokenizer": tokenizer_dir, "train.max_steps": 3,
                                             "train.log_every": 3, "train.sample_tokens": 0, "optim.warmup_steps": 1,
                                             **extra})
    sets = [s for i, s in enumerate(sets) if not (s.startswith("run.dir") or (s == "--set" and
                                                                                sets[i + 1].startswith("run.dir")))]
    return ["sweep", "--out", str(out), *sets, *args]


def last_eval(run_dir, step=None):
    rows = [r for r in read_metrics(run_dir) if "eval_loss" in r and (step is None or r["step"] == step)]
    return rows[-1]["eval_loss"]


def test_grid_sweep_summary_best_config_and_hparams(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "grid"
    cli.main(sweep_cmd(out, tokenizer_dir, "--grid", "optim.lr=1e-3,3e-3", "--grid", "train.micro_batch=2,4"))
    stdout = capsys.readouterr().out
    trials = sorted(p.name for p in out.glob("trial-*"))
    assert trials == ["trial-000", "trial-001", "trial-002", "trial-003"]
    expected_params = [(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)]  # the first key varies slowest
    losses = {}
    for name, (lr, mb) in zip(trials, expected_params):
        cfg = load_config(str(out / name / "config.yaml"))
        assert (cfg.optim.lr, cfg.train.micro_batch, cfg.train.max_steps) == (lr, mb, 3)
        assert (out / name / "final" / "model.safetensors").is_file()
        losses[name] = last_eval(out / name)
    ranking = sorted(losses, key=losses.get)
    assert len(set(losses.values())) == 4

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["trial"] for r in rows] == ranking and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:
        assert float(r["eval_loss"]) == pytest.approx(losses[r["trial"]]) and r["status"] == "done"
        assert (float(r["optim.lr"]), int(r["train.micro_batch"])) == expected_params[trials.index(r["trial"])]
    md = (out / "summary.md").read_text().splitlines()
    assert md[2].startswith("| rank | trial | status | optim.lr | train.micro_batch | eval_loss | step |")
    assert [line.split(" | ")[1] for line in md[4:8]] == ranking
    table_lines = [line for line in stdout.splitlines() if line.strip().startswith(("1 ", "2 ", "3 ", "4 "))]
    assert [line.split()[1] for line in table_lines] == ranking

    # best.yaml: the winner's full config, ready to train from scratch
    best = load_config(str(out / "best.yaml"))
    winner = load_config(str(out / ranking[0] / "config.yaml"))
    assert (best.optim.lr, best.train.micro_batch) == (winner.optim.lr, winner.train.micro_batch)
    assert best.run.dir == "" and best.run.name == "grid-best" and best.train.stop_at_step == 0
    assert best.data == winner.data and best.model == winner.model
    assert f"best: {ranking[0]}" in stdout

    # TensorBoard HParams: one session per trial with its parameters and metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for name, (lr, mb) in zip(trials, expected_params):
        acc = EventAccumulator(str(out / "tb" / name))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        assert hp["optim.lr"].number_value == pytest.approx(lr) and hp["train.micro_batch"].number_value == mb
        assert hp["status"].string_value == "done"
        assert acc.Scalars("sweep/eval_loss")[0].value == pytest.approx(losses[name])

    # the same directory cannot silently take a different sweep
    with pytest.raises(SystemExit) as e:
        cli.main(sweep_cmd(out, tokenizer_dir, "--grid", "optim.lr=1e-2"))
    assert e.value.code == 2 and "already holds a different sweep" in capsys.readouterr().err


def test_successive_halving_stops_the_right_trials(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "sha"
    lrs = ["1e-4", "1e-3", "3e-3", "1e-2"]
    cli.main(sweep_cmd(out, tokenizer_dir, "--grid", f"optim.lr={','.join(lrs)}", "--rungs", "2,3", "--eta", "2",
                       **{"train.max_steps": 4, "train.log_every": 1}))
    names = [f"trial-{i:03d}" for i in range(4)]
    at2 = {n: last_eval(out / n, 2) for n in names}
    survivors2 = sorted(names, key=at2.get)[:2]  # rung 1: the best half at step 2
    at3 = {n: last_eval(out / n, 3) for n in survivors2}
    survivor3 = min(survivors2, key=at3.get)  # rung 2: the best half of those at step 3
    for n in names:
        steps = sorted({r["step"] for r in read_metrics(out / n) if "loss" in r})
        expected_last = 4 if n == survivor3 else 3 if n in survivors2 else 2
        assert steps[-1] == expected_last, (n, steps)
        assert (out / n / "final").is_dir() == (n == survivor3)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    status = {r["trial"]: r["status"] for r in rows}
    assert status[survivor3] == "done" and rows[0]["trial"] == survivor3
    assert sorted(status.values()) == ["done", "stopped@2", "stopped@2", "stopped@3"]
    # a trial that went on is the run it would have been uninterrupted: same losses, bit for bit
    from engine import dist
    from engine.trainer import Trainer

    straight = tmp_path / "straight"
    cfg = load_config(str(out / survivor3 / "config.yaml"), [f"run.dir={straight}", "train.stop_at_step=0"])
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
        dist.shutdown()
    resumed = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(out / survivor3) if "loss" in r]
    assert resumed == [(r["step"], r["loss"], r["lr"]) for r in read_metrics(straight) if "loss" in r]
    assert last_eval(out / survivor3) == last_eval(straight)


def test_random_search_respects_ranges_and_seed(tmp_path, capsys):
    specs = ["optim.lr=loguniform:1e-5:1e-3", "model.dropout=uniform:0:0.2", "train.grad_accum=int:1:4",
             "train.micro_batch=8,16"]
    params = [sweep.parse_param(s)[0] for s in specs]
    trials = sweep.make_trials(params, 300, seed=7)
    lrs = [t.params["optim.lr"] for t in trials]
    assert all(1e-5 <= v <= 1e-3 for v in lrs)
    assert all(0 <= t.params["model.dropout"] <= 0.2 for t in trials)
    assert {t.params["train.grad_accum"] for t in trials} == {1, 2, 3, 4}
    assert {t.params["train.micro_batch"] for t in trials} == {8, 16}
    # log-uniform: as many draws below the geometric middle (1e-4) as above it
    below = sum(v < 1e-4 for v in lrs)
    assert 0.4 < below / len(lrs) < 0.6
    assert [t.params for t in sweep.make_trials(params, 300, seed=7)] == [t.params for t in trials]
    assert [t.params for t in sweep.make_trials(params, 300, seed=8)] != [t.params for t in trials]

    args = ["sweep", "--random", "3", "--seed", "5", "--dry-run", "--out", str(tmp_path / "r"),
            *[a for s in specs for a in ("--grid", s)]]
    cli.main(args)
    first = capsys.readouterr().out
    cli.main(args)
    assert capsys.readouterr().out == first and len(first.splitlines()) == 3
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    expected = sweep.make_trials(params, 3, seed=5)
    assert first.splitlines()[0] == "trial-000  " + " ".join(expected[0].overrides())


def test_bad_sweeps_name_every_problem_and_write_nothing(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--out", str(out), "--grid", "optim.lr=loguniform:0:1e-3", "--grid", "optim.lrr=1,2",
                  "--grid", "model.dropout=uniform:0:0.1", "--metric", "loss"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    for part in ("loguniform needs a positive low end", "is a range: add --random N", "--metric 'loss' must be"):
        assert part in err, err
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--out", str(out), "--grid", "optim.lrr=1,2", "--grid", "train.max_steps=5,0",
                  "--rungs", "0,400"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    for part in ("unknown config key 'optim.lrr'", "train.max_steps must be positive", "--rungs must lie between"):
        assert part in err, err
    assert not out.exists()
    # a time limit inside the array script's checkpoint signal would requeue every task forever
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--out", str(out), "--grid", "optim.lr=1e-3,2e-3", "--slurm", "--sbatch-arg=--time=5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--time 5 (300 s) is not longer than the array script's checkpoint signal" in err, err
    assert not out.exists()
    # a metric the runs do not log is caught after the first trial, not after the whole sweep
    with pytest.raises(SystemExit) as e:
        cli.main(sweep_cmd(out, tokenizer_dir, "--grid", "optim.lr=1e-3,2e-3", "--metric", "eval_acuracy",
                           **{"train.max_steps": 1}))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--metric 'eval_acuracy' is not logged by these runs; they log eval_loss, eval_ppl" in err
    assert not (out / "trial-001").exists()
    import shutil

    shutil.rmtree(out)
    # problems of the data every trial shares are found before trial 0 starts: exit 2, nothing written
    (tmp_path / "nocol.jsonl").write_text('{"body": "some text here"}\n' * 4)
    for source, problem in (("missing.jsonl", "no such file"), ("nocol.jsonl", "data.text_column 'text' is not in")):
        with pytest.raises(SystemExit) as e:
            cli.main(["sweep", "--out", str(out), "--grid", "optim.lr=1e-3,2e-3", "--set",
                      f"data.source={tmp_path / source}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and problem in err and "trial-000" not in err, err
        assert not out.exists()


def _slurm_ready() -> str:
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (CI brings up SLURM with .ci/slurm_up.sh)"
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if info.returncode != 0 or not any(s in info.stdout for s in ("idle", "mixed", "allocated")):
        return f"no SLURM node up: {info.stdout.strip() or info.stderr.strip()}"
    return ""


@pytest.mark.skipif(bool(_slurm_ready()), reason=_slurm_ready() or "")
def test_slurm_array_sweep_with_halving(tmp_path, tokenizer_dir):
    """The real cluster: one array job per rung through launch/slurm/sweep.sbatch, then the summary."""
    out = tmp_path / "slurm"
    proc = check(run_ftl(sweep_cmd(out, tokenizer_dir, "--grid", "optim.lr=1e-4,1e-2", "--rungs", "2", "--slurm",
                                   "--wait", "--poll-s", "1", "--sbatch-arg=--gpus-per-node=0",
                                   "--sbatch-arg=--cpus-per-task=1", **{"train.max_steps": 3}), timeout=600))
    assert proc.stderr.count("submitted array job") == 2
    at2 = {n: last_eval(out / n, 2) for n in ("trial-000", "trial-001")}
    winner = min(at2, key=at2.get)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["trial"], r["status"]) for r in rows] == [(winner, "done"),
                                                         (max(at2, key=at2.get), "stopped@2")]
    assert (out / winner / "final").is_dir() and len(list((out / "slurm").glob("*.out"))) == 3
