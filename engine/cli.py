"""The `ftl` command line. It parses and dispatches; the work happens in the modules it calls.

Exit codes (engine/errors.py, docs/fault-tolerance.md): 0 done; 2 a user mistake (one message naming every
problem, nothing written); 1 a runtime failure (a full disk: "no space left on device" and where);
3 diverged; 4 hung; 75 preempted (requeue); 130 Ctrl-C (after the checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from engine.errors import DiskFull, RunStopped, StoppedEarly, UsageError

SET_HELP = "Override a config key, e.g. --set train.max_steps=50 (repeatable)."


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every import
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="ftl-engine", prog_name="ftl")
# The deepspeed launcher appends --local_rank=N right after the script (`ftl --local_rank=0 train ...`);
# the rank itself is read from LOCAL_RANK by engine.dist, so the flag is accepted and ignored.
@click.option("--local_rank", "--local-rank", type=int, hidden=True, expose_value=False)
def cli():
    """ftl: fine-tune GPT-2-family models on one process, torchrun/DDP, DeepSpeed ZeRO or SLURM.

    Start with `ftl train` (the built-in offline demo job), then `ftl config show` to see every
    setting it used, and `ftl config keys` for what each key means.
    """


# ------------------------------------------------------------------------------------------- train

@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
def train(config, overrides, no_progress):
    """Train from CONFIG (YAML/JSON) in this process, or as one rank under torchrun/deepspeed/srun.

    With no CONFIG it runs the built-in default job: a small GPT-2 on the text of Python's own
    documentation, offline, on CPU in a few minutes. Output goes to runs/<run.name>/ (metrics.jsonl,
    tb/, checkpoints/, final/). Re-running the same command resumes from the newest checkpoint.
    """
    from engine.config import load_config

    cfg = load_config(config, overrides)
    _quiet_libraries()
    from engine import dist
    from engine.trainer import Trainer

    trainer = Trainer(cfg, progress=not no_progress)
    try:
        trainer.train()
    finally:
        trainer.close()
        del trainer  # the model and its wrappers hold the process group: release them before shutdown
        dist.shutdown()


# ------------------------------------------------------------------------------------------ launch

@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Ranks on this node (default: all local GPUs, or 1 on a CPU machine).")
@click.option("--nnodes", type=click.IntRange(min=1), default=None, help="Nodes in the job (default 1).")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="deepspeed: this node's line of the hostfile, each node launching itself (no ssh). "
                   "torchrun's c10d rendezvous numbers the nodes itself.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="Where the nodes meet: an address of the first node and a free port, the same on every node.")
@click.option("--rdzv-id", default=None, help="torchrun: a job id shared by all nodes (e.g. $SLURM_JOB_ID).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="torchrun restarts all ranks this many times after a failure (not after a preemption exit).")
@click.option("--launcher", type=click.Choice(["torchrun", "deepspeed"]), default="torchrun", show_default=True,
              help="Process launcher.")
@click.option("--hosts", default=None, metavar="H1,H2,...",
              help="deepspeed: node names for the generated hostfile (with --node-rank: labels only).")
@click.option("--hostfile", default=None, type=click.Path(dir_okay=False),
              help="deepspeed: an existing hostfile ('host slots=N' lines).")
@click.option("--dry-run", is_flag=True, help="Print the launcher command (and a generated hostfile) instead of running it.")
def launch(config, overrides, nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id, max_restarts, launcher,
           hosts, hostfile, dry_run):
    """Start the ranks of this node with torchrun or the deepspeed launcher (one node, or one of several).

    \b
    ftl launch my.yaml                                   # all local GPUs (1 process on CPU)
    ftl launch --nnodes 2 --rdzv-endpoint node001:29400 my.yaml       # on each of 2 nodes
    ftl launch --launcher deepspeed --nproc-per-node 8 my.yaml
    ftl launch --launcher deepspeed --nnodes 2 --node-rank R --rdzv-endpoint node001:29400 my.yaml

    SIGUSR1/SIGTERM reach every rank, which saves a checkpoint and exits 75; `ftl launch` then exits 75
    too (job scripts requeue on it).
    """
    from engine.commands import launch as launch_lib
    from engine.config import load_config

    problems: list[str] = []
    try:
        cfg = load_config(config, overrides)  # fail here, once, rather than in every rank
        _warn_launcher_backend(launcher, cfg)
    except UsageError as e:
        problems += e.problems
    train_args = ([config] if config else []) + [a for o in overrides for a in ("--set", o)]
    plan = launch_lib.LaunchPlan(train_args, nproc_per_node, launcher, nnodes, node_rank, rdzv_endpoint, rdzv_id,
                                 max_restarts, [h for h in (hosts or "").split(",") if h.strip()], hostfile)
    problems += plan.problems()
    if problems:
        raise UsageError(problems, hint="See `ftl launch --help`.")
    if dry_run:
        click.echo(plan.render())
        return
    sys.exit(launch_lib.run(plan))


def _warn_launcher_backend(launcher: str, cfg) -> None:
    """The deepspeed launcher only starts processes; what trains is dist.backend. DDP under it works (a hostfile
    launch without torchrun's rendezvous), so this is a warning, not a refusal, but rarely what was meant."""
    if launcher == "deepspeed" and cfg.dist.backend != "deepspeed":
        click.echo(f"warning: --launcher deepspeed only starts the ranks; dist.backend={cfg.dist.backend} trains with "
                   f"{cfg.dist.backend.upper()}, not DeepSpeed ZeRO. For ZeRO add --set dist.backend=deepspeed (and "
                   f"dist.zero_stage=N); for {cfg.dist.backend.upper()} the usual launcher is --launcher torchrun.",
                   err=True)


# ------------------------------------------------------------------------------------------- eval

@cli.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "source", default=None,
              help="Data source (same forms as data.source); default: the run's own (its config.yaml's data.source).")
@click.option("--split", type=click.Choice(["validation", "train"]), default="validation", show_default=True,
              help="Split to evaluate (a source without one is split by data.val_fraction).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per sample (default: the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--text-column", default=None, help="Text column (default: the run's, else 'text').")
@click.option("--label-column", default=None, help="Label column for classification models.")
@click.option("--max-batches", type=click.IntRange(min=0), default=0, help="Stop after N batches (0: all).")
@click.option("--stride", type=click.IntRange(min=0), default=None,
              help="LM: also score whole documents with sliding windows of --seq-len tokens this far apart "
                   "(default: the run's eval.stride; 0: off).")
@click.option("--format", "data_format", type=click.Choice(["text", "prompt_completion", "chat"]), default=None,
              help="How to read the data (default: the run's data.format, else text): prompt_completion and chat "
                   "report the loss and perplexity of the completions only (the chat template: the model's own).")
@click.option("--prompt-column", default=None, help="prompt_completion: prompt column (default: the run's, else 'prompt').")
@click.option("--completion-column", default=None,
              help="prompt_completion: completion column (default: the run's, else 'completion').")
@click.option("--messages-column", default=None, help="chat: messages column (default: the run's, else 'messages').")
@click.option("--generations", type=click.IntRange(min=0), default=0, show_default=True,
              help="prompt_completion/chat: also show greedy completions of this many prompts of the split.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics (and per-class scores, confusion matrix) as JSON.")
def eval_cmd(model, source, split, seq_len, batch_size, text_column, label_column, max_batches, stride, data_format,
             prompt_column, completion_column, messages_column, generations, as_json):
    """Evaluate an exported model (a run's final/ or best/, or the run directory itself) on a dataset.

    Classification models get a report with accuracy, macro/micro/weighted F1, a per-class table of
    precision, recall, F1 and support, and the confusion matrix; language models their loss and perplexity
    (with --format prompt_completion or chat: over the completions only).
    """
    _quiet_libraries()
    from engine import evaluation
    from engine.commands import models as tools

    header, report = tools.evaluate_model_report(
        Path(model), source, split, seq_len, batch_size, text_column, label_column, max_batches, stride,
        generations=generations, format=data_format, prompt_column=prompt_column,
        completion_column=completion_column, messages_column=messages_column)
    if as_json:
        out = {**header, **report.to_json()}
        out.pop("head")
        click.echo(json.dumps(out))
    else:
        click.echo(evaluation.render_text(report, header))


# --------------------------------------------------------------------------------------- generate

@cli.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default=None, help="Text to continue.")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Many prompts: one per non-empty line, or JSON lines with a \"prompt\" field (.jsonl). "
                   "Prints one JSON object per prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts generated together (left-padded) with --prompts-file.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --prompts-file: write the JSON lines here instead of stdout.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="0 means greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", "chat", default=None, metavar="MESSAGES",
              help="A conversation as a JSON list of {\"role\", \"content\"} messages (or a file holding one): "
                   "rendered with the model's saved chat template, the assistant's reply printed.")
def generate(model, prompt, prompts_file, batch_size, output, max_new_tokens, temperature, top_k, top_p, seed, chat):
    """Continue --prompt (or every prompt of --prompts-file) with an exported language model (a run's
    final/ or the run directory), or answer a --chat conversation."""
    if sum(x is not None for x in (prompt, prompts_file, chat)) != 1:
        raise UsageError("give exactly one of --prompt TEXT, --prompts-file FILE or --chat MESSAGES")
    if output is not None and prompts_file is None:
        raise UsageError("--output goes with --prompts-file (a single --prompt prints its text)")
    _quiet_libraries()
    from engine.commands import models as tools

    if chat is not None:
        messages = tools.parse_messages(chat)
        click.echo(tools.generate_chat(Path(model), messages, max_new_tokens, temperature, top_k, top_p, seed))
        return
    if prompt is not None:
        click.echo(tools.generate_text(Path(model), prompt, max_new_tokens, temperature, top_k, top_p, seed))
        return
    rows = tools.generate_many(Path(model), tools.read_prompts(prompts_file), max_new_tokens, temperature, top_k,
                               top_p, seed, batch_size)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        click.echo(lines, nl=False)
    else:
        output.write_text(lines, encoding="utf-8")
        click.echo(f"wrote {len(rows)} completions to {output}", err=True)


# ----------------------------------------------------------------------------------------- export

@cli.command()
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the model to.")
@click.option("--format", "fmt", type=click.Choice(["hf", "onnx", "onnx-kv", "torchscript"]), default="hf",
              show_default=True,
              help="hf: safetensors + tokenizer + generation config; onnx: model.onnx, (input_ids, attention_mask) -> "
                   "logits (checked with onnxruntime); onnx-kv: language models, model.onnx with a KV cache "
                   "(past_key_values.<i>.key/value in, present.<i>.key/value out) for generation, checked against "
                   "transformers' generate; torchscript: model.pt. Each is checked before --out appears.")
@click.option("--force", is_flag=True,
              help="Replace --out if an earlier `ftl export` wrote it (its export.json lists its files); "
                   "any other existing, non-empty --out is always refused.")
def export(checkpoint_dir, out, fmt, force):
    """Export a checkpoint, a run (its newest checkpoint that verifies) or a model directory (a run's final/).

    A checkpoint's files are checked against their digests first (a damaged checkpoint named here exits 2).
    Every format is reloaded and compared with the PyTorch model's logits; a mismatch exits 1 and
    leaves nothing at --out. The check's numbers are saved in OUT/export.json. --out is never a directory
    the export did not write: a non-empty one exits 2 (see --force).
    """
    _quiet_libraries()
    from engine.commands import export as deploy

    try:
        report = deploy.export(Path(checkpoint_dir), Path(out), fmt, force=force)
    except deploy.ExportCheckFailed as e:
        click.echo(f"error: export check FAILED, nothing written to {out}: {e}", err=True)
        sys.exit(1)
    click.echo(f"exported {report['source']} -> {out} ({fmt}); check: {report['check']}, "
               f"max |logit difference| {report['max_abs_diff']:.3g} on a padded batch of shape "
               f"{tuple(report['probe_shape'])}")


# ----------------------------------------------------------------------------------------- config

@cli.group()
def config():
    """Inspect configurations."""


@config.command("show")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def config_show(config_file, overrides):
    """Print the resolved config (defaults + CONFIG_FILE + overrides) as YAML."""
    from engine.config import load_config

    click.echo(load_config(config_file, overrides).to_yaml(), nl=False)


@config.command("keys")
def config_keys():
    """List every config key with its type, default and meaning."""
    from engine.config import describe

    for key, tname, default, help_text in describe():
        click.echo(f"{key}  ({tname}, default {default!r})\n    {help_text}")


# ---------------------------------------------------------------------------------------- explain

def _attention_spec(ctx, param, value):
    if value is None:
        return None
    layer, sep, head = value.partition(":")
    try:
        return int(layer), (None if head in ("", "mean") else int(head))
    except ValueError:
        raise click.BadParameter("use LAYER:HEAD (e.g. 1:0) or LAYER:mean, counting from 0") from None


@cli.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--text", required=True, help="The input to explain.")
@click.option("--method", type=click.Choice(["ig", "grad_input"]), default="ig", show_default=True,
              help="ig: integrated gradients; grad_input: gradient x input.")
@click.option("--steps", type=click.IntRange(min=2, max=1024), default=64, show_default=True,
              help="Integrated-gradients quadrature nodes.")
@click.option("--baseline", type=click.Choice(["pad", "zero"]), default="pad", show_default=True,
              help="Integrated-gradients baseline: the pad token's embedding, or zeros.")
@click.option("--target", default=None, help="cls: a label; lm: one token (default: the prediction).")
@click.option("--top-k", type=click.IntRange(min=1, max=50), default=5, show_default=True,
              help="lm: next-token candidates shown per position.")
@click.option("--attention", callback=_attention_spec, default=None, metavar="LAYER:HEAD",
              help="Also draw this layer's attention map for one head, or LAYER:mean for the mean of its heads.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("explain"), show_default=True,
              help="Directory for explain.html, attributions.png, attention.png, explain.json.")
def explain(model, text, method, steps, baseline, target, top_k, attention, out):
    """Explain a prediction of an exported model: token attributions (cls: for the predicted class;
    lm: for the most likely next token) and, for lm, the top-k next tokens at each position."""
    _quiet_libraries()
    from engine.commands import explain as explain_lib

    result = explain_lib.explain(Path(model), text, method, steps, baseline, target, top_k, attention)
    files = explain_lib.write(result, out, str(model), text)
    click.echo(explain_lib.summary(result))
    click.echo(f"wrote {files['html']} ({', '.join(str(p.name) for k, p in files.items() if k != 'html')} beside it)")


# ------------------------------------------------------------------------------------------ sweep

@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override for every trial (repeatable).")
@click.option("--grid", "grid", multiple=True, metavar="KEY=SPEC",
              help="A swept key: KEY=v1,v2,... or, with --random, KEY=uniform:LO:HI | loguniform:LO:HI | int:LO:HI "
                   "(repeatable).")
@click.option("--random", "n_random", type=click.IntRange(min=0), default=0,
              help="Random search: draw this many trials (0: the full grid).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option("--metric", default="eval_loss", show_default=True, help="Eval metric that ranks trials.")
@click.option("--mode", type=click.Choice(["auto", "min", "max"]), default="auto", show_default=True,
              help="Whether lower or higher is better (auto: max for accuracy/F1, else min).")
@click.option("--rungs", default="", metavar="S1,S2,...",
              help="Successive halving: compare the trials at these steps and continue only the best 1/eta.")
@click.option("--eta", type=int, default=2, show_default=True, help="Successive halving keeps 1/eta at each rung.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep directory (default: sweeps/<run.name>).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes per trial (above 1: each trial runs under `ftl launch`).")
@click.option("--slurm", is_flag=True, help="Submit the trials as a SLURM array job (launch/slurm/sweep.sbatch).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="Extra sbatch argument for --slurm, e.g. --sbatch-arg=--partition=gpu (repeatable).")
@click.option("--wait/--no-wait", default=None,
              help="--slurm: wait for the array job(s) and write the summary (needed with --rungs).")
@click.option("--poll-s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="--slurm --wait: seconds between squeue polls.")
@click.option("--dry-run", is_flag=True, help="Print the trials and exit (nothing written).")
def sweep(config, overrides, grid, n_random, seed, metric, mode, rungs, eta, out, nproc_per_node, slurm, sbatch_args,
          wait, poll_s, dry_run):
    """Hyperparameter sweep over CONFIG: each trial is a run in its own directory; then a summary
    table (stdout, CSV, markdown) sorted by --metric, TensorBoard HParams and best.yaml."""
    from engine.commands import sweep as sweep_lib

    try:
        rung_steps = [int(r) for r in rungs.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--rungs must be comma-separated steps (got {rungs!r})") from None
    if slurm and rung_steps and wait is False:
        raise UsageError("--slurm with --rungs needs --wait (the sweep promotes trials between array jobs)")
    if not slurm and wait is not None:
        raise UsageError("--wait/--no-wait go with --slurm")
    plan, out_dir = sweep_lib.build_plan(config, list(overrides), list(grid), n_random, seed, metric, mode,
                                         rung_steps, eta, out)
    if dry_run:
        for t in plan.trial_list():
            click.echo(f"{t.name}  {' '.join(t.overrides()) or '(base config)'}")
        click.echo(f"{len(plan.trials)} trial(s) -> {out_dir}", err=True)
        return
    _quiet_libraries()
    if not slurm:  # the trials' shared data and tokenizer, before trial 0 and before anything is written
        sweep_lib.preflight(plan)
    if slurm:
        sweep_lib.slurm_preflight(plan, out_dir, list(sbatch_args))
    fresh = not out_dir.exists()
    sweep_lib.write_plan(plan, out_dir)
    log = lambda line: click.echo(line, err=True)
    try:
        _run_sweep(sweep_lib, plan, out_dir, slurm, sbatch_args, wait, rung_steps, nproc_per_node, poll_s, log)
    except UsageError:
        if fresh and not any(out_dir.glob("trial-*/checkpoints")):
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)  # bad data or model: leave nothing behind
        raise


def _run_sweep(sweep_lib, plan, out_dir, slurm, sbatch_args, wait, rung_steps, nproc_per_node, poll_s, log):
    if slurm:
        sweep_lib.run_slurm(plan, out_dir, list(sbatch_args), wait=bool(wait) or bool(rung_steps),
                            nproc=nproc_per_node if nproc_per_node > 1 else None, log=log, poll_s=poll_s)
        if not (wait or rung_steps):
            log(f"sweep: when the array job is done: ftl sweep-summary {out_dir}")
            return
    else:
        runner = sweep_lib.run_in_process if nproc_per_node == 1 else sweep_lib.subprocess_runner(nproc_per_node)
        sweep_lib.run_local(plan, out_dir, runner, log=log)
    sweep_lib.summarize(out_dir, log=click.echo)


@cli.command("sweep-summary")
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def sweep_summary(sweep_dir):
    """(Re)write the summary of a sweep directory: table, summary.csv/.md, TensorBoard HParams, best.yaml."""
    from engine.commands import sweep as sweep_lib

    sweep_lib.summarize(sweep_dir, log=click.echo)


# ------------------------------------------------------------------------------------------ serve

@cli.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="TCP port (0: any free port, printed at start).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Without --api-key there is no authentication: bind other than loopback only "
                   "with a key, or behind a proxy you trust.")
@click.option("--max-body-bytes", type=click.IntRange(min=64), default=65536, show_default=True,
              help="Larger requests get 413.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Upper limit a /generate request may ask for.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most prompts/texts in one request.")
@click.option("--quiet", is_flag=True, help="No access log.")
@click.option("--api-key", envvar="FTL_API_KEY", default=None, show_envvar=True,
              help="Require `Authorization: Bearer KEY` on every request but GET /health (what the openai client "
                   "sends as its api_key). Prefer the environment variable: a command line is visible to other users.")
@click.option("--served-model-name", default=None,
              help="The model id of the OpenAI endpoints (default: the run's name for a run's final/ or best/, "
                   "else the directory's name).")
def serve(model, port, host, max_body_bytes, max_new_tokens, max_batch, quiet, api_key, served_model_name):
    """Serve an exported model over HTTP: POST /generate (lm) or /classify (cls), JSON in and out, and for
    language models the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, streaming included)."""
    _quiet_libraries()
    from engine.commands import serve as serve_lib

    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option out")
    service = serve_lib.ModelService(Path(model), max_new_tokens=max_new_tokens, max_batch=max_batch,
                                     served_name=served_model_name)
    try:
        server = serve_lib.make_server(service, host, port, max_body_bytes, quiet, api_key)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_host, bound_port = server.server_address[:2]
    endpoint = (f"POST /generate, OpenAI API at /v1 (model {service.served_name!r})" if service.head == "lm"
                else "POST /classify")
    auth = "API key required" if api_key else "no authentication"
    click.echo(f"serving {service.model_dir} ({service.head}) on http://{bound_host}:{bound_port} "
               f"- {endpoint}, GET /health; {auth}; Ctrl-C stops", err=True)
    if not api_key and bound_host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(f"warning: {bound_host} is reachable from other machines and there is no --api-key", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------------------ slurm

@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes for the job.")
@click.option("--gpus-per-node", type=click.IntRange(min=0), required=True, help="GPUs per node (0: a CPU job).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Ranks per node (default: one per GPU, or 1 for a CPU job).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None,
              help="CPUs per node for the ranks (default: the whole node with GPUs, else one per rank).")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--time", "time_limit", default=None, metavar="TIME",
              help="Time limit (minutes, H:MM:SS or D-HH:MM:SS; default the template's 24:00:00).")
@click.option("--account", default=None, help="SLURM account to charge.")
@click.option("--job-name", default=None, help="Job name (default ftl-<run directory name>).")
@click.option("--launcher", type=click.Choice(["torchrun", "deepspeed"]), default="torchrun", show_default=True,
              help="Template: launch/slurm/train.sbatch (torchrun) or train_deepspeed.sbatch.")
@click.option("--signal-before", type=int, default=300, show_default=True, metavar="SECONDS",
              help="USR1 this long before the time limit: the ranks checkpoint and the job requeues itself.")
@click.option("--no-requeue", is_flag=True, help="Checkpoint on the signal but do not requeue.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="Sweep: an array job over every combination (launch/slurm/sweep.sbatch), one run directory per trial.")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None, help="Sweep: trials running at once.")
@click.option("--sbatch", "sbatch_options", multiple=True, metavar="--OPT=VALUE",
              help="Extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the script here (default: print it; with --submit: <run dir>/slurm/<job name>.sbatch).")
@click.option("--submit", is_flag=True, help="Submit the script with sbatch and print the job id.")
def slurm(config, overrides, nodes, gpus_per_node, nproc_per_node, cpus_per_task, partition, time_limit, account,
          job_name, launcher, signal_before, no_requeue, grid, max_parallel, sbatch_options, output, submit):
    """Write a SLURM batch script for CONFIG from the launch/slurm templates (and submit it).

    \b
    ftl slurm my.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 -o job.sbatch
    ftl slurm my.yaml --gpus-per-node 1 --grid optim.lr=1e-4,3e-4 --grid train.micro_batch=8,16 --submit

    The run directory becomes an absolute path (keep it on storage all nodes see); the job logs to
    <run dir>/slurm/<job name>-<job id>.out, checkpoints on USR1 before its time limit or on
    preemption, requeues itself and resumes. A sweep writes <run dir>/grid.txt and trains trial i in
    <run dir>/trial-<iii>.
    """
    from engine.commands import slurm as slurm_lib
    from engine.config import load_config

    problems: list[str] = []
    cfg = None
    try:
        cfg = load_config(config, overrides)
        _warn_launcher_backend(launcher, cfg)
    except UsageError as e:
        problems += e.problems
    job = slurm_lib.SlurmJob(config, list(overrides), nodes, gpus_per_node, nproc_per_node, cpus_per_task, partition,
                             time_limit, account, job_name, launcher, signal_before, not no_requeue, list(grid),
                             max_parallel, list(sbatch_options))
    problems += job.problems()
    if max_parallel and not grid:
        problems.append("--max-parallel is for sweeps (--grid)")
    if submit and not slurm_lib.sbatch_available():
        problems.append("--submit: sbatch not found (run on a SLURM login node, or write the script with -o and copy it)")
    if problems:
        raise UsageError(problems, hint="See `ftl slurm --help`.")
    names = job.names(cfg.run_dir)
    script = Path(output) if output else (names["log_dir"] / f"{names['job_name']}.sbatch" if submit else None)
    text, names = job.write(cfg.run_dir, script, sys.argv[2:] if sys.argv[1:2] == ["slurm"] else None)
    if script is None:
        click.echo(text, nl=False)
        click.echo(f"# logs will go to {names['log_dir']}/ (created)", err=True)
        return
    click.echo(f"wrote {script}" + (f" and {names['grid_file']} ({len(job.trials)} trials)" if job.trials else ""))
    if submit:
        try:
            job_id = slurm_lib.submit(script)
        except RuntimeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        log = str(names["log"]).replace("%x", str(names["job_name"])).replace("%j", job_id).replace("%A", job_id)
        click.echo(f"submitted job {job_id}; log: {log}")


# ------------------------------------------------------------------------------------------ bench

def _csv(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


def _invocation() -> str:
    """How this process was started, for the benchmark report (`ftl bench ...` or `python script ...`)."""
    argv = sys.argv
    if "bench" in argv:
        return " ".join(["ftl", *argv[argv.index("bench"):]])
    return " ".join(["python", *argv])


def _on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise ValueError(v)
    return v == "on"


@cli.command()
@click.option("--quick", is_flag=True, help="CPU smoke grid: gpt2-tiny, seq 32, a few steps (seconds).")
@click.option("--preset", "presets", callback=_csv(str), default=None, help="Model presets, e.g. gpt2,gpt2-xl.")
@click.option("--backend", "backends", callback=_csv(str), default=None,
              help="ddp, zero0..zero3, zero2-offload, zero3-offload, fsdp, fsdp-offload (comma-separated).")
@click.option("--micro-batch", "micro_batches", callback=_csv(int), default=None, help="Micro-batch sizes, e.g. 8,16.")
@click.option("--seq-len", "seq_lens", callback=_csv(int), default=None, help="Sequence lengths, e.g. 1024.")
@click.option("--compile", "compiles", callback=_csv(_on_off), default=None, help="off,on (both: compare).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches per optimizer step.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Timed optimizer steps per point.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed steps first (compilation).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--baselines", default="torch,hf", show_default=True,
              help="Comma-separated: torch (plain loop), hf (transformers Trainer); 'none' for ours only.")
@click.option("--ablate", is_flag=True, default=None, help="Also time the engine with every fast-path switch off.")
@click.option("--vocab", type=click.IntRange(min=16), default=None, help="Vocabulary size of the random tokens.")
@click.option("--checkpointing", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Activation checkpointing (auto: on for gpt2-large/xl).")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/out", show_default=True,
              help="Directory for throughput.json / .md / .png.")
@click.option("--profile", is_flag=True, help="Also torch.profiler the fastest point (profile.txt + trace).")
@click.option("--memory-table", is_flag=True, help="Print the analytic model-state memory table and exit.")
@click.option("--find-max-micro-batch", is_flag=True, help="CUDA: largest micro-batch per preset/backend, then exit.")
@click.option("--mb-range", default="1,1024", show_default=True, metavar="START,LIMIT",
              help="--find-max-micro-batch: the powers of two tried, from START up to LIMIT.")
@click.option("--world", type=click.IntRange(min=1), default=1, show_default=True, help="Ranks, for --memory-table.")
@click.option("--gpu-gib", type=float, default=80.0, show_default=True, help="GPU memory, for --memory-table.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Engine config override for 'ours'.")
def bench(quick, presets, backends, micro_batches, seq_lens, compiles, grad_accum, steps, warmup, precision, baselines,
          ablate, vocab, checkpointing, out, profile, memory_table, find_max_micro_batch, mb_range, world, gpu_gib,
          overrides):
    """Throughput grid: the engine vs a plain PyTorch loop vs Hugging Face Trainer, side by side.

    Prints a table (tokens/s, MFU, step time, peak GPU memory, host RSS, ratio ours/baseline) and writes
    OUT/throughput.json, .md and .png. Run it under torchrun for several GPUs. See benchmarks/RESULTS.md.
    """
    _quiet_libraries()
    from engine.commands import bench as bench_lib
    from engine.model import PRESETS

    q = bench_lib.QUICK if quick else {}
    presets = presets or q.get("presets") or ["gpt2"]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UsageError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if memory_table:
        click.echo(bench_lib.memory_table(presets, world, gpu_gib))
        return
    backends = backends or q.get("backends") or ["ddp"]
    for b in backends:
        bench_lib.parse_backend(b)
    base = [] if baselines.strip() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    bad = [b for b in base if b not in ("torch", "hf")]
    if bad:
        raise UsageError(f"--baselines: unknown {', '.join(bad)}; use torch, hf or none")
    opts = bench_lib.Options(
        steps=steps or q.get("steps", 10), warmup=q.get("warmup", 3) if warmup is None else warmup,
        precision=precision, baselines=tuple(base), ablate=bool(ablate if ablate is not None else q.get("ablate", False)),
        vocab=vocab or q.get("vocab", 50257), out=Path(out), overrides=tuple(overrides),
        gradient_checkpointing=checkpointing, profile=profile, command=_invocation(),
    )
    seq_lens = seq_lens or q.get("seq_lens") or [1024]
    if find_max_micro_batch:
        try:
            start, limit = (int(x) for x in mb_range.split(","))
        except ValueError:
            raise UsageError(f"--mb-range {mb_range!r} must be START,LIMIT (two integers)") from None
        bench_lib.find_max_micro_batch(presets, backends, seq_lens[0], opts, limit=limit, start=start)
        return
    points = [bench_lib.Point(p, b, mb, t, c, grad_accum or q.get("grad_accum", 1))
              for p in presets for b in backends for mb in (micro_batches or q.get("micro_batches") or [8])
              for t in seq_lens for c in (compiles if compiles is not None else q.get("compiles", [False]))]
    bench_lib.run_grid(points, opts)


# ------------------------------------------------------------------------------------------- data

@cli.group()
def data():
    """Inspect training data as the engine sees it."""


@data.command("stats")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--split", type=click.Choice(["train", "validation"]), default="train", show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="How many rare tokens to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def data_stats(config_file, overrides, split, top, as_json):
    """Tokens per byte, document lengths, the rarest tokens and the label distribution of a run's data.

    Uses the tokenizer training would use (data.tokenizer, the model's own, or the BPE it would train)
    with data.add_tokens added, e.g. `ftl data stats --set data.source=builtin:stdlib_packages --set model.head=cls`.
    """
    from engine.config import load_config

    cfg = load_config(config_file, overrides)
    _quiet_libraries()
    from engine.commands import datastats

    result = datastats.stats(cfg, split, top)
    click.echo(json.dumps(result) if as_json else datastats.render(result))


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ftl", standalone_mode=False)
    except UsageError as e:
        _report(e.render())
        sys.exit(e.exit_code)
    except (RunStopped, StoppedEarly) as e:  # preempted (75), Ctrl-C (130), diverged (3): a message, no traceback
        _report(f"stopped: {e}")
        sys.exit(e.exit_code)
    except DiskFull as e:
        _report(f"error: {e}", every_rank=True)
        sys.exit(e.exit_code)
    except OSError as e:
        from engine.checkpoint import is_disk_full

        if not is_disk_full(e):
            raise
        _report(f"error: no space left on device while writing {e.filename or 'a file'} ({e.strerror or e})",
                every_rank=True)
        sys.exit(DiskFull.exit_code)
    except click.exceptions.Abort:
        _report("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _report(message: str, every_rank: bool = False) -> None:
    from engine.dist import launcher_env

    rank = launcher_env()["rank"]
    if rank == 0:  # one message for the job, not one per rank
        click.echo(message, err=True)
    elif every_rank:  # where it happened may be another rank's own disk
        click.echo(f"[rank {rank}] {message}", err=True)


if __name__ == "__main__":
    main()
