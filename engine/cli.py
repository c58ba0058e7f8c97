"""The `ftl` command line. It parses and dispatches; the work happens in the modules it calls.

Exit codes: 0 done, 2 bad usage/config/data (one message naming every problem, nothing written),
anything else a runtime failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from engine.errors import UsageError

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
        dist.shutdown()


# ------------------------------------------------------------------------------------------ launch

@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Processes on this node (default: all local GPUs, or 1 on a CPU machine).")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes in the job.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This node's rank.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="Rendezvous address (multi-node).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="torchrun restarts the whole job this many times after a failure.")
@click.option("--launcher", type=click.Choice(["torchrun"]), default="torchrun", show_default=True,
              help="Process launcher.")
@click.option("--dry-run", is_flag=True, help="Print the launcher command instead of running it.")
def launch(config, overrides, nproc_per_node, nnodes, node_rank, rdzv_endpoint, max_restarts, launcher, dry_run):
    """Start N training processes on this node (and join a multi-node job) with torchrun."""
    from engine import launcher as launch_lib
    from engine.config import load_config

    load_config(config, overrides)  # fail here, once, rather than in every rank
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
    train_args = ([config] if config else []) + [a for o in overrides for a in ("--set", o)]
    cmd = launch_lib.torchrun_command(nproc_per_node or launch_lib.default_nproc(), train_args, nnodes, node_rank,
                                      rdzv_endpoint, max_restarts)
    if dry_run:
        click.echo(launch_lib.render(cmd))
        return
    sys.exit(subprocess.call(cmd))


# ------------------------------------------------------------------------------------------- eval

@cli.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "source", required=True, help="Data source (same forms as data.source).")
@click.option("--split", type=click.Choice(["validation", "train"]), default="validation", show_default=True,
              help="Split to evaluate (a source without one is split by data.val_fraction).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per sample (default: the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--text-column", default=None, help="Text column (default: the run's, else 'text').")
@click.option("--label-column", default=None, help="Label column for classification models.")
@click.option("--max-batches", type=click.IntRange(min=0), default=0, help="Stop after N batches (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(model, source, split, seq_len, batch_size, text_column, label_column, max_batches, as_json):
    """Evaluate an exported model (a run's final/ or the run directory itself) on a dataset."""
    _quiet_libraries()
    from engine import tools

    result = tools.evaluate_model(Path(model), source, split, seq_len, batch_size, text_column, label_column,
                                  max_batches)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


# --------------------------------------------------------------------------------------- generate

@cli.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="0 means greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed):
    """Continue PROMPT with an exported language model (a run's final/ or the run directory)."""
    _quiet_libraries()
    from engine import tools

    click.echo(tools.generate_text(Path(model), prompt, max_new_tokens, temperature, top_k, top_p, seed))


# ----------------------------------------------------------------------------------------- export

@cli.command()
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the model to.")
def export(checkpoint_dir, out):
    """Write a Hugging Face model directory from a saved checkpoint (or a run's latest one)."""
    _quiet_libraries()
    from engine import tools

    path = tools.export_checkpoint(Path(checkpoint_dir), Path(out))
    click.echo(f"exported {path}")


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


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ftl", standalone_mode=False)
    except UsageError as e:
        _report(e.render())
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        _report("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _report(message: str) -> None:
    from engine.dist import launcher_env

    if launcher_env()["rank"] == 0:  # one message for the job, not one per rank
        click.echo(message, err=True)


if __name__ == "__main__":
    main()
