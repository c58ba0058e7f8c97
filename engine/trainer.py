"""The training loop.

`Trainer(cfg)` builds everything in the order that keeps bad input harmless: config -> process group
-> the run directory usable and not in use by another run (its lock) -> the checkpoint to resume from,
verified -> data (columns, labels, non-empty) -> tokenizer -> model shape checks -> ONLY THEN the run
directory is created. `train()` writes config.yaml and the logs only once it knows it will train.
`train()` is the loop; `train_step()` is one optimizer step over its micro-batches.

The loss of a step is the sum of per-target losses over all its micro-batches and ranks divided by
the global target count (one all-reduce per step, before the first backward), so any
world x micro_batch x grad_accum split of the same global batch gives the same loss and update.
Nothing in the loop reads a device value back except at log steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from engine import (backends, checkpoint, dist, evaluation, fastpath, fault, losses, memory, metrics,
                    model as model_lib, optim, ownership, resume, transfer)
from engine.data import sources as data
from engine.config import Config, dump_resolved
from engine.errors import ExportMismatch, UsageError
from engine.model import load_exported


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, env: dist.DistEnv | None = None, progress: bool = True):
        self.cfg = cfg
        # Until the first step, SIGTERM/SIGUSR1/SIGINT end the process at once (nothing to save yet).
        self.signals = fault.PreemptionSignals().install()
        self.lock: ownership.RunLock | None = None
        try:
            self._build(env, progress)
        except BaseException:  # a refused run leaves no lock held and no handler installed behind it
            self.signals.restore()
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self, env: dist.DistEnv | None, progress: bool) -> None:
        cfg = self.cfg
        self.env = env or dist.init(cfg.train.device, fault.startup_collective_timeout(cfg))
        self.run_dir = cfg.run_dir
        # Every log line of a run goes to stderr (the progress bar's stream too), rank 0 only: stdout stays free
        # for what a command returns (a sweep's table, `ftl eval --json`).
        self.log = _log_line if self.env.is_main else (lambda *a, **k: None)
        self._claim_run_dir()  # usable, and ours: another run on it stops here (exit 2), before reading it
        fastpath.configure(cfg, self.env.device)  # train.precision=auto -> bf16/fp32, TF32
        self.backend = backends.create(cfg, self.env)
        warn = (lambda line: print(line, file=sys.stderr, flush=True)) if self.env.is_main else (lambda line: None)
        compiles = type(self.backend).compile is not backends.Backend.compile  # the backend implements it
        cfg.model.compile = fastpath.resolve_compile(cfg, self.env.device, warn, compiles)  # auto -> on/off

        # 1. Decide whether to resume (before anything is written; the checkpoint verified) and validate data + model.
        self.resume_from = self._resume_target()
        self.resume_state = checkpoint.read_state(self.resume_from) if self.resume_from else None
        self.epoch_plan = self._saved_epoch_plan()  # train.epochs already resolved by this run's checkpoint
        if self.resume_state is not None:  # config drift: errors now, warnings logged
            resume.check_config(self.resume_from, self.resume_state, self._drift_view(), self.env.world_size,
                                self.log if self.env.is_main else (lambda line: None))
        self.source = model_lib.resolve(cfg.model)
        self.data = self._prepare_data()
        self._check_shapes()
        if cfg.train.epochs:
            self._resolve_epochs()
        if cfg.optim.warmup_steps > cfg.train.max_steps:
            peak = optim.lr_at(cfg.train.max_steps - 1, cfg.optim, cfg.train.max_steps)
            self.log(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                     f"(train.max_steps={cfg.train.max_steps}): the learning rate never reaches optim.lr={cfg.optim.lr:g} "
                     f"(it ends at {peak:.3g}); lower optim.warmup_steps")

        # 2. Build the model: identical init on every rank, then per-rank RNG streams for dropout.
        seed_everything(cfg.run.seed)
        with self.backend.construct():
            hf = model_lib.build(cfg.model, self.source, self.data.tokenizer, self.data.num_labels)
            if cfg.model.head == "lm":  # in construct(): ZeRO-3 partitions the padded embedding as it is made
                fastpath.install_lm_head(hf, cfg.perf)
        # Parameter bytes held as whole tensors once built: the full model for DDP, ~nothing under ZeRO-3,
        # whose construction partitions each module as it is made, nothing under FSDP, which builds on the meta
        # device (reported with the first step's memory).
        self.built_param_bytes = sum(p.numel() * p.element_size() for p in hf.parameters() if not p.is_meta)
        with self.backend.adapting():  # model.freeze / LoRA (after construct: adapters are new parameters)
            transfer.adapt(hf, cfg.model)
        if self.data.label_names:
            hf.config.id2label = dict(enumerate(self.data.label_names))
            hf.config.label2id = {n: i for i, n in enumerate(self.data.label_names)}
        self.hf_config = hf.config
        if self.resume_from is not None:
            resume.check_model_shape(self.resume_from, hf.config)
        self.n_params = model_lib.num_parameters(hf) - fastpath.padding_parameters(hf)  # MFU counts the real model
        module = model_lib.TrainModule(hf, cfg.model.head, perf=cfg.perf, packed=cfg.data.pack,
                                       focal_gamma=cfg.loss.focal_gamma, label_smoothing=cfg.loss.label_smoothing)
        self.base_fingerprint = transfer.base_fingerprint(module) if cfg.model.lora_rank else None
        # MFU counts what runs: the head's matmul, weight gradients only where weights train (metrics.py)
        self.flops_per_token = metrics.training_flops_per_token(hf, cfg.model.head, cfg.data.seq_len)
        self.trainable = transfer.trainable_summary(module)  # before a backend shards the parameters
        self.backend.setup(module, transfer.param_groups(module, cfg))
        if cfg.model.lora_rank and self.base_fingerprint is None:  # FSDP builds on meta: its weights exist now
            self.base_fingerprint = transfer.base_fingerprint(module)  # (all ranks: sharded weights gather)
        if cfg.model.compile:
            fastpath.start_compile_report()
            self.backend.compile()  # lazily: the first step compiles (and falls back to eager if that fails)
        seed_everything(cfg.run.seed + 7919 * (self.env.rank + 1))

        # 3. Everything checked: create the run directory (rank 0) and lock it, and restore state. config.yaml
        # and the logs wait for train(): a run that is already complete rewrites nothing.
        problem = None
        if self.env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if self.lock is None:
                    self.lock = ownership.RunLock(self.run_dir).acquire()
            except UsageError as e:
                problem = e.render()
            except OSError as e:
                problem = f"error: run.dir {self.run_dir} cannot be created: {e.strerror or e}"
        first = dist.agree_on_error(problem)
        if first:
            raise UsageError(first.removeprefix("error: "))
        self.layout = data.Layout(self.env.world_size, self.env.rank, cfg.train.micro_batch, cfg.train.grad_accum)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, cfg.checkpoint.keep, self.env.rank, self.env.world_size)
        if self.resume_from is not None and checkpoint.has_digests(self.resume_from):
            self.checkpointer.verified = self.resume_from  # retention keeps it until a newer one verifies
        self.fault = fault.FaultTolerance(cfg, self.env, self.run_dir, self.backend, lambda line: self.metrics.print(line),
                                          signals=self.signals)
        self.step, self.tokens_seen, self.sample_index = 0, 0.0, 0
        self.best = evaluation.BestTracker(cfg.eval)
        self.export_failures: list[str] = []  # failed export checks (best/, final/): the run exits 1 at its end
        if self.resume_from is not None:
            # A rank with no RNG file of its own (the job grew) gets a stream of its rank and the step.
            reseed = lambda step: seed_everything(cfg.run.seed + 7919 * (self.env.rank + 1) + 104729 * step)
            state = self.checkpointer.load(self.resume_from, self.backend, reseed)
            self.step, self.tokens_seen = int(state["step"]), float(state["tokens"])
            self.sample_index = int(state["sample_index"])
            self._check_base(state.get("base_fingerprint"))
            self.best.load_state(state.get("best"))
            self.log(f"resumed from {self.resume_from} at step {self.step} (global sample {self.sample_index})")
        elif cfg.checkpoint.resume == "auto":
            self.log(f"no complete checkpoint in {self.run_dir / 'checkpoints'}: starting from step 0")
        self.batches = data.TrainBatches(self.data, self.layout, cfg.run.seed, self.env.device, self.sample_index)
        self.windows = (evaluation.window_dataset(self.raw["validation"], self.data.tokenizer, cfg.data.text_column,
                                                  cfg.data.seq_len, cfg.eval.stride)
                        if cfg.eval.stride and len(self.raw["validation"]) else None)
        self.metrics = metrics.Metrics(self.run_dir, self.env.is_main, cfg.train.max_steps, self.step, progress,
                                       cfg.run.report_to, cfg.to_dict())
        self.throughput = metrics.Throughput(self.flops_per_token, metrics.peak_flops(self.env.device),
                                             self.env.world_size)

    # ------------------------------------------------------------------------------------------ setup
    def _claim_run_dir(self) -> None:
        """Rank 0 checks that run.dir can be used (not a file, not on a read-only parent), that final/ and
        best/ there are the engine's to replace, and locks an existing run directory; every rank agrees."""
        problems: list[str] = []
        if self.env.is_main:
            problems = ownership.run_dir_problems(self.run_dir)
            for name in ("final", "best"):
                if not problems:
                    problems += ownership.target_problems(self.run_dir / name, force=True, what=f"run.dir's {name}/")
            if not problems and self.run_dir.is_dir():
                try:
                    self.lock = ownership.RunLock(self.run_dir).acquire()
                except UsageError as e:
                    problems = e.problems + ([e.hint] if e.hint else [])
        first = dist.agree_on_error("\n".join(problems) if problems else None)
        if first:
            raise UsageError(first.split("\n"))

    def _resume_target(self) -> Path | None:
        """The checkpoint to continue from, verified by all ranks together (each hashes a share of it).
        auto: the newest that verifies (damaged ones are named and skipped; if none verifies: exit 2);
        a path: it must verify (exit 2)."""
        r = self.cfg.checkpoint.resume
        if r == "none":
            return None
        if r != "auto":
            path = Path(r)
            if not checkpoint.is_complete(path):
                raise UsageError(f"checkpoint.resume {r!r} is not a complete checkpoint directory "
                                 f"(it needs {checkpoint.STATE} and {checkpoint.COMPLETE})")
            checkpoint.check_explicit(path, collective=True)
            return path
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if self.env.is_main else (lambda line: None)
        return checkpoint.choose(self.run_dir / "checkpoints", log, collective=True)

    def _saved_epoch_plan(self) -> dict | None:
        """train.epochs as the checkpoint resolved it: with the same epochs its step count stands (whatever the
        number of ranks now), so a resume never changes the schedule's length."""
        cfg, saved = self.cfg, (self.resume_state or {}).get("epochs")
        if cfg.train.epochs and saved and saved.get("epochs") == cfg.train.epochs:
            cfg.train.max_steps, cfg.train.epochs = int(saved["max_steps"]), 0.0
            return saved
        return None

    def _drift_view(self) -> Config:
        """The config the drift check compares: train.epochs still unresolved counts as the checkpoint's steps
        (it is resolved, and announced, once the data is known)."""
        if not self.cfg.train.epochs:
            return self.cfg
        saved_steps = (self.resume_state or {}).get("config", {}).get("train", {}).get("max_steps", 0)
        view = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, epochs=0.0,
                                                                       max_steps=saved_steps or self.cfg.train.max_steps))
        return view

    def _resolve_epochs(self) -> None:
        """train.epochs -> train.max_steps, once: epochs x training samples (after packing/windowing), in
        global batches of this run, counted on from the checkpoint's sample position when resuming with
        other epochs than it had."""
        cfg, lay = self.cfg, self.cfg.train
        samples = len(self.data.train)
        global_batch = self.env.world_size * lay.micro_batch * lay.grad_accum
        done_steps = int((self.resume_state or {}).get("step", 0))
        done_samples = int((self.resume_state or {}).get("sample_index", 0))
        steps = done_steps + max(0, math.ceil((lay.epochs * samples - done_samples) / global_batch))
        steps = max(steps, 1)
        self.epoch_plan = {"epochs": lay.epochs, "max_steps": steps, "train_samples": samples,
                           "global_batch": global_batch}
        self.log(f"train.epochs={lay.epochs:g}: {steps} steps (ceil({lay.epochs:g} x {samples} training samples / "
                 f"global batch {global_batch})" + (f", continuing from step {done_steps}" if done_steps else "") + ")")
        cfg.train.max_steps, cfg.train.epochs = steps, 0.0

    def _epochs_note(self) -> str:
        p = self.epoch_plan
        if not p:
            return ""
        return (f"# train.epochs={p['epochs']:g} resolved to train.max_steps={p['max_steps']}: {p['train_samples']} "
                f"training samples, global batch {p['global_batch']}\n")

    def _prepare_data(self) -> data.Prepared:
        """Load, tokenize and check the data on every rank; rank 0 trains a tokenizer if one is needed."""
        cfg = self.cfg
        problem, prepared, raw = None, None, None
        if self.env.is_main:
            print(f"preparing data: {cfg.data.source}", file=sys.stderr, flush=True)
        try:
            raw = data.load_raw(cfg.data, cfg.run.seed, need_label=cfg.model.head == "cls")
        except UsageError as e:
            problem = e
        # Reading can fail on one rank only (a file one node cannot see). The steps below hold collectives (the
        # tokenizer's broadcast, the tokenization cache's barriers), so the ranks agree right here: otherwise the
        # failed rank waits in the agreement below while the others wait in a barrier, until the timeout.
        self._raise_if_any_rank_failed(problem)
        try:
            tokenizer = self._tokenizer(raw)
            transfer.add_tokens(tokenizer, cfg.data.add_tokens)
            prepared = data.prepare(raw, tokenizer, cfg.data, cfg.model.head, cfg.model.num_labels,
                                    prompts=cfg.eval.generations)
            problems = []
            if cfg.model.head == "cls":
                prepared.class_weights, problems = losses.class_weights(cfg.loss, prepared.label_counts())
            if cfg.eval.metric and not len(prepared.validation):
                problems.append(f"eval.metric={cfg.eval.metric} needs a validation split, and {cfg.data.source!r} "
                                f"leaves none; raise data.val_fraction above 0")
            if problems:
                raise UsageError(problems)
            self.raw = raw
        except UsageError as e:
            problem = e
        # Ranks agree before going on, so a bad file on one rank cannot leave the others waiting.
        self._raise_if_any_rank_failed(problem)
        return prepared

    @staticmethod
    def _raise_if_any_rank_failed(problem: UsageError | None) -> None:
        first = dist.agree_on_error(problem.render() if problem else None)
        if first:
            raise problem or UsageError(first.removeprefix("error: "))

    def _tokenizer(self, raw):
        cfg = self.cfg
        if cfg.data.tokenizer:
            return data.load_tokenizer(cfg.data.tokenizer)
        if self.resume_from is not None:  # the run's own, as trained (a checkpoint carries a copy)
            for saved in (self.resume_from / "tokenizer", self.run_dir / "tokenizer"):
                if saved.is_dir():
                    return data.load_tokenizer(str(saved))
        if self.source.has_tokenizer:
            return data.load_tokenizer(str(self.source.local_dir or self.source.name))
        blob = None
        if self.env.is_main:
            tok = data.train_bpe(data.text_iterator(raw["train"], cfg.data.text_column), cfg.data.tokenizer_vocab)
            blob = tok.backend_tokenizer.to_str()
        return data.tokenizer_from_json(dist.broadcast_object(blob))

    def _check_shapes(self) -> None:
        cfg, problems = self.cfg, []
        if self.source.config is not None:
            positions = model_lib.max_positions(self.source.config)
            if cfg.model.max_positions and cfg.model.max_positions < positions:
                problems.append(f"model.max_positions={cfg.model.max_positions} is below the model's {positions} "
                                f"positions (it can only grow); use 0 to keep them")
            positions = max(positions, cfg.model.max_positions)
            if cfg.data.seq_len > positions:
                problems.append(f"data.seq_len={cfg.data.seq_len} exceeds the model's {positions} positions; "
                                f"lower data.seq_len or raise model.max_positions")
        if cfg.model.head == "cls" and cfg.model.num_labels and self.data.num_labels > cfg.model.num_labels:
            problems.append(f"model.num_labels={cfg.model.num_labels} but the data has {self.data.num_labels} labels")
        if problems:
            raise UsageError(problems)

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg, m = self.cfg, self.metrics
        if self.step >= cfg.train.max_steps and (self.run_dir / "final").is_dir():
            m.print(f"run already complete at step {self.step}: {self.run_dir.resolve()} "
                    f"(raise train.max_steps to continue, or set run.dir for a new run)")
            m.close()
            return {"step": self.step, "final": str(self.run_dir / "final"), "already_complete": True}
        stop = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        if stop < cfg.train.max_steps and self.step >= stop:  # reached in an earlier run: nothing to do
            m.print(f"run already stopped at step {self.step} (train.stop_at_step={stop}); raise it to continue")
            m.close()
            return {"step": self.step, "stopped": True}
        if self.best.stopped:
            m.print(f"run stopped early at step {self.step} (best {self.best.key} {self.best.best:.4g} at step "
                    f"{self.best.best_step}): {self.run_dir.resolve()}")
            m.close()
            return {"step": self.step, "final": str(self.run_dir / "final"), "already_complete": True}
        self._write_run_files()
        m.print(self._banner())  # what runs, before anything it computes (the first eval included)
        for line in self._data_lines():
            m.print(line)
        m.print(memory.planned_line(self.backend))
        if self.step == 0:
            before = self.evaluate()
            m.log(0, before)
            m.print(f"eval before training: {_fmt(before)}")
            self.track_best(before)
        memory_logged = False
        window_loss = torch.zeros(2, device=self.env.device)  # [summed loss, targets] since the last log
        window_tokens = torch.zeros((), device=self.env.device)
        self.throughput.reset()
        result: dict = {}
        self.fault.loop_starts()  # signals now stop the run at a step boundary, after a checkpoint
        while self.step < stop:
            self.fault.step_begins(self.step + 1)  # the hang watchdog's deadline starts
            loss_sum, count, tokens, grad_norm, lr = self.train_step(self.batches.next())
            self.step += 1
            self.sample_index += self.layout.global_batch
            window_loss += torch.stack([loss_sum, count])
            window_tokens += tokens
            if not memory_logged:  # once, after the first step: what each rank really holds
                memory.log_measured(self.backend, m, self.step, self.built_param_bytes)
                if cfg.model.compile:
                    m.print(fastpath.compile_report())
                memory_logged = True
            # True when any rank got SIGTERM/SIGUSR1/SIGINT (agreed by all); counts non-finite (skipped) steps.
            # The last step's status is read at once (final), so a NaN or a signal there is not dropped.
            preempted = self.fault.step_ends(self.step, grad_norm, final=self.step == stop)
            # checkpoint.every_minutes: rank 0's clock decided, in the same all-reduce, so all ranks save here.
            save_now = preempted or (self.fault.save_due and self.step < stop) or (
                cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < stop)

            # Checkpoint steps log too, so a checkpoint's token count and the logged losses cover every step.
            if self.step % cfg.train.log_every == 0 or self.step == stop or save_now:
                # The one sync point: reduce the window's sums and read them back.
                dist.all_reduce_sum(window_loss)
                dist.all_reduce_sum(window_tokens)
                (loss_total, targets), tok = window_loss.tolist(), float(window_tokens)
                self.tokens_seen += tok
                row = {"loss": loss_total / max(targets, 1.0), "lr": lr, "grad_norm": float(grad_norm),
                       "tokens": self.tokens_seen, "epoch": round(self.sample_index / len(self.data.train), 6),
                       **self.fault.log_fields(), **self.throughput.read(tok)}
                m.log(self.step, row)
                m.print(f"step {self.step}/{cfg.train.max_steps} | " + _fmt(row))
                window_loss.zero_(), window_tokens.zero_()
                result = row
            m.advance(1)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < stop and not preempted:
                ev = self.evaluate()
                m.log(self.step, ev)
                m.print(f"eval at step {self.step}: {_fmt(ev)}")
                if self.track_best(ev):
                    break
                self.throughput.reset()
            if save_now:
                path = self.save_checkpoint()
                self.throughput.reset()
                if preempted:  # every rank stops here, at the same step: 75 asks for a requeue, 130 (Ctrl-C) not
                    raise self.fault.preempted(self.step, path)
        if self.step < cfg.train.max_steps and not self.best.stopped:
            return self.stop_early(result)
        return self.finish(result)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]):
        """One optimizer step. Returns device tensors (summed loss, targets, tokens, grad norm) and the lr."""
        head, backend = self.cfg.model.head, self.backend
        counts = torch.stack([losses.target_count(mb, head) for mb in micro_batches])
        # + the preemption flag, same all-reduce; in flight during the first forward, waited for at its backward
        pending = self.fault.all_reduce_count(counts.sum())
        extra = backend.forward_extras(counts.sum())  # fp16: the gradient scale the chunked LM loss expects
        loss_sum = torch.zeros((), device=self.env.device)
        tokens = torch.zeros((), device=self.env.device)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with backend.accumulate(last), backend.autocast():
                summed = backend.model(**mb, **extra)
            if i == 0:  # each rank's share of the global mean; DDP/DeepSpeed then average over ranks: * world
                scale = self.env.world_size / pending.wait().clamp(min=1.0)
            # NaN instead of a non-finite loss: the gradient all-reduce then skips this step on every rank.
            backend.backward(fault.nan_if_nonfinite(summed) * scale, last)
            loss_sum += summed.detach().float()
            tokens += data.real_tokens(mb)
        lr = optim.lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        grad_norm = backend.step(lr, self.cfg.train.clip_grad)
        return loss_sum, counts.sum(), tokens, grad_norm, lr

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        with self.fault.slow_section():
            report = evaluation.evaluate_report(self.backend.module, self.data, self.env, self.cfg.train.micro_batch,
                                                self.cfg.train.eval_batches, self.backend.autocast, self.windows,
                                                self.cfg.eval.generation_tokens)
        evaluation.write_report(self.run_dir, self.step, report, self.metrics)
        for g in report.generations:
            self.metrics.print(f"  greedy completion at step {self.step}: {json.dumps(g['prompt'][-80:])} -> "
                               f"{json.dumps(g['completion'])}")
        self.last_eval = report.scalars
        return report.scalars

    def track_best(self, scalars: dict, final: Path | None = None, final_failed: bool = False) -> bool:
        """eval.metric: export best/ on a new best (a copy of `final` when given; left as it was when final/
        failed its check and was removed); True when patience has run out. Every rank decides alike: the
        scalars are already reduced over ranks."""
        best = self.best
        if not best.update(self.step, scalars):
            stop = best.should_stop and not final
            if stop:
                best.stopped = True
                self.metrics.print(f"early stopping at step {self.step}: no {best.key} improvement in "
                                   f"{best.bad_evals} evaluations (best {best.best:.4g} at step {best.best_step})")
            return stop
        if self.cfg.eval.save_best:
            if final_failed:  # final/ failed its check and was removed: nothing to copy
                self.metrics.print(f"new best {best.key} {best.best:.4g} at step {self.step}: best/ not updated "
                                   f"(final/ failed its export check)")
                return False
            if final is not None:
                if self.env.is_main:
                    evaluation.copy_model_dir(final, self.run_dir / "best")
                dist.barrier()
            else:
                self.export_checked(self.run_dir / "best")
            self.metrics.print(f"new best {best.key} {best.best:.4g} at step {self.step}: {self.run_dir / 'best'}")
        return False

    def export_checked(self, out: Path) -> bool:
        """`export`, but a failed check does not end the run: it is reported now and again at the end, where it
        makes the run exit 1 after everything else (checkpoint, final/, evaluation) is done. True if it passed."""
        try:
            self.export(out)
            return True
        except ExportMismatch as e:
            self.export_failures.append(f"{out.name}/ at step {self.step}: {e}")
            self.metrics.print(f"error: export check FAILED for {out}/ (removed, so it cannot pass for a good model; "
                               f"checkpoints are kept; training goes on and the run will exit 1): {e}")
            return False

    def _check_base(self, saved: str | None) -> None:
        if saved and self.base_fingerprint and saved != self.base_fingerprint:
            raise UsageError(f"model.name {self.cfg.model.name!r} no longer gives the base weights the LoRA "
                             f"checkpoint {self.resume_from} was trained on; restore that model or start a new run")

    # ----------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        return {"tokens": self.tokens_seen, "sample_index": self.sample_index,
                "global_batch": self.layout.global_batch, "config": self.cfg.to_dict(), "epochs": self.epoch_plan,
                "best": self.best.state(), "base_fingerprint": self.base_fingerprint}

    def save_checkpoint(self) -> Path:
        def extras(d: Path) -> None:
            self.hf_config.to_json_file(d / "config.json")
            self.data.tokenizer.save_pretrained(d / "tokenizer")

        with self.fault.slow_section():
            path = self.checkpointer.save(self.step, self.backend, self.trainer_state(), extras)
        self.fault.saved()  # checkpoint.every_minutes counts from here
        self.metrics.print(f"checkpoint saved: {path}")
        return path

    def _write_run_files(self) -> None:
        """config.yaml and the tokenizer in the run directory (rank 0), once the run is known to train;
        written whole or not at all (a temporary name, then a rename)."""
        if self.env.is_main:
            dump_resolved(self.cfg, self.run_dir / "config.yaml", self._epochs_note())
            checkpoint.write_dir_atomically(self.run_dir / "tokenizer", self.data.tokenizer.save_pretrained)

    def export(self, out: Path) -> float:
        """final/ (or best/) as plain transformers files, then reloaded and checked against the engine's logits.
        Returns the largest logit difference; raises ExportMismatch (the directory removed) when the check fails."""
        with self.fault.slow_section():  # rank 0 writes while the others wait: start-up-sized limits
            state = self.backend.full_state_dict()
            if self.env.is_main:
                adapter = None
                if self.cfg.model.lora_rank:  # beside the merged model: the adapters alone, in PEFT's format
                    unmerged = state
                    adapter = lambda d: transfer.save_adapter(unmerged, self.cfg.model, self.cfg.model.head,
                                                              d / "adapter", self.data.tokenizer)
                state = transfer.merge_lora(state, self.cfg.model)  # final/ is a plain transformers model
                checkpoint.export_hf(self.hf_config, self.cfg.model.head, state, self.data.tokenizer, out,
                                     self.data.label_names, info={"source": f"run {self.run_dir}, step {self.step}"},
                                     extras=adapter)
            dist.barrier()
            try:
                diff = self.verify_export(out)
            except Exception:
                if self.env.is_main:  # a directory that failed its check must not stay where a good model belongs
                    shutil.rmtree(out, ignore_errors=True)
                raise
        self.metrics.print(f"export check: {out.name}/ reloaded by plain transformers gives the engine's logits "
                           f"(max |diff| {diff:.2g}) within tolerance {self.check_tolerance:.2g}")
        return diff

    def verify_export(self, out: Path, atol: float | None = None) -> float:
        """Max |logit difference| between the engine's model and `out` reloaded by plain transformers (the
        tolerance it was held to: `self.check_tolerance`); raises ExportMismatch, saying what differed, when
        the difference exceeds the tolerance.

        Like with like: both run on the engine's device, in the dtype the engine computes in (16-bit under
        DeepSpeed bf16/fp16, whose parameters are the fp32 export rounded the same way), with the engine's
        GELU kernel and attention implementation, and with TF32 off. What is left is the order of
        floating-point sums (the engine's padded vocabulary gives its head another matmul shape), so the
        tolerance follows the compute dtype (`export_tolerance`) unless `atol` is given. Every rank computes
        the engine's logits (ZeRO-3 gathers); rank 0 compares and is the only one that can raise."""
        probe = {k: v.to(self.env.device) for k, v in data.probe_batch(self.data).items()}
        mask = probe.get("attention_mask")
        module = self.backend.module
        was = module.training
        module.eval()
        with torch.no_grad(), fastpath.exact_fp32():
            ours = module.logits(probe["input_ids"], mask)
        module.train(was)
        dtype = ours.dtype
        self.check_tolerance = 0.0
        if not self.env.is_main:
            return 0.0
        where = f"{self.env.device.type}, {str(dtype).removeprefix('torch.')}"
        try:
            reloaded = load_exported(out, self.cfg.model.head, attn_implementation=self.cfg.model.attn_implementation)
            if self.cfg.perf.fused_gelu:
                fastpath.fuse_gelu(reloaded)  # the engine's kernel for the same function (the config keeps gelu_new)
            reloaded.to(device=self.env.device, dtype=dtype)
            with torch.no_grad(), fastpath.exact_fp32():
                theirs = reloaded(input_ids=probe["input_ids"], attention_mask=mask).logits
            del reloaded
        except Exception as e:  # noqa: BLE001  (the reload failing is this check failing, not a crash)
            raise ExportMismatch(f"the export check of {out} could not run: reloading it with plain transformers "
                                 f"on {where} failed with {type(e).__name__}: {e}") from e
        if fault.planned("bad_export", self.step, self.env.rank) is not None:
            theirs = theirs.clone()
            theirs.view(-1)[theirs.numel() // 2] += 1.0
        diff, self.check_tolerance = compare_logits(ours, theirs, mask, out, where, atol)
        return diff

    def finish(self, last_row: dict) -> dict:
        m = self.metrics
        self.batches.close()
        self.fault.loop_done()
        ckpt = self.save_checkpoint()
        final = self.run_dir / "final"
        final_ok = self.export_checked(final)
        if self.best.stopped:  # the evaluation that stopped the run was of these very weights
            after = self.last_eval
        else:
            after = self.evaluate()
            m.log(self.step, after)
            m.print(f"eval after training: {_fmt(after)}")
            self.track_best(after, final=final, final_failed=not final_ok)
        summary = {"step": self.step, **last_row, **after, "final": str(final), "checkpoint": str(ckpt)}
        if self.env.is_main:
            # prompt_completion/chat runs show greedy completions of held-out prompts at every evaluation instead
            if self.cfg.model.head == "lm" and self.cfg.train.sample_tokens and not self.data.sft and final_ok:
                text = sample(final, self.cfg.train.sample_prompt, self.cfg.train.sample_tokens, self.cfg.run.seed)
                m.text("sample", text, self.step)
                m.print("sample: " + json.dumps(text))
                summary["sample"] = text
            m.print(f"run directory: {self.run_dir.resolve()}")
        m.close()
        self._raise_export_failures(ckpt)
        return summary

    def _raise_export_failures(self, ckpt: Path) -> None:
        """A run whose export check failed ends with exit 1, after its work is saved: never discarded."""
        if self.export_failures:
            raise ExportMismatch("; ".join(self.export_failures) + f". The checkpoint {ckpt} is complete and kept: "
                                 f"`ftl export {ckpt} --out DIR` exports it again and checks it on the CPU in fp32")

    def stop_early(self, last_row: dict) -> dict:
        """train.stop_at_step: checkpoint and evaluate, so the run can be compared now and continued later."""
        m = self.metrics
        self.batches.close()
        self.fault.loop_done()
        ckpt = self.save_checkpoint()
        ev = self.evaluate()
        m.log(self.step, ev)
        m.print(f"eval at step {self.step}: {_fmt(ev)}")
        self.track_best(ev)
        m.print(f"stopped at step {self.step} of {self.cfg.train.max_steps} (train.stop_at_step); "
                f"run again with a later train.stop_at_step (or 0) to continue")
        m.close()
        self._raise_export_failures(ckpt)
        return {"step": self.step, **last_row, **ev, "checkpoint": str(ckpt), "stopped": True}

    def _data_lines(self) -> list[str]:
        """prompt_completion/chat: what became of the examples (truncated, dropped, packing efficiency)."""
        d, c = self.data, self.cfg.data
        if not d.sft:
            return []
        lines = [f"data: {d.stats[s].line(s, c.overflow, c.seq_len)}" for s in ("train", "validation") if d.stats.get(s)]
        if d.chat is not None:
            lines.append(f"data: chat template: {d.chat.origin}; generation stops at token ids {d.chat.stop_ids} "
                         f"({', '.join(repr(d.tokenizer.convert_ids_to_tokens(i)) for i in d.chat.stop_ids)})")
            if len(d.chat.stop_ids) < 2:
                lines.append("warning: the chat template ends an assistant turn with no single end-of-turn token, so "
                             "generation stops only at EOS; a template whose turns end in a special token (the "
                             "built-in ChatML's <|im_end|>) stops where the turn ends")
        return lines

    def close(self) -> None:
        self.fault.close()
        self.metrics.close(finished=False)  # a no-op after finish()/stop_early(); else the attempt stopped short
        self.batches.close()
        self.backend.close()
        if self.lock is not None:
            self.lock.release()

    def _banner(self) -> str:
        c, lay = self.cfg, self.layout
        return (f"model {c.model.name} ({self.n_params / 1e6:.2f}M params, head={c.model.head}) | "
                f"backend {self.backend.name} x{self.env.world_size} on {self.env.device.type} | "
                f"global batch {lay.global_batch} = {lay.world} ranks x {lay.micro_batch} x {lay.grad_accum} accum | "
                f"seq {c.data.seq_len} | {len(self.data.train)} train / {len(self.data.validation)} eval samples"
                + (f" | {self.trainable}" if c.model.freeze or c.model.lora_rank else ""))


evaluate = evaluation.evaluate  # the module-level eval, shared with `ftl eval`


def _log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fmt(row: dict) -> str:
    parts = []
    for k, v in row.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}" if k != "lr" else f"{k} {v:.3e}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


def export_tolerance(dtype: torch.dtype) -> float:
    """Allowed |logit difference| relative to max(1, largest |logit|) when both sides compute alike.

    fp32: 1e-4, room for the summation order of the matmuls through every layer (fp32 agrees to ~1e-6 here).
    16-bit: every result is rounded to the dtype, and a different summation order inside a matmul (the padded
    head's shape) moves a logit by one unit in the last place, so 4 units at the largest logit: 3% in bf16,
    0.4% in fp16. A wrong weight, head or config moves logits by whole units, far above either."""
    if dtype in (torch.bfloat16, torch.float16):
        return 4 * torch.finfo(dtype).eps
    return 1e-4


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None, out: Path, where: str,
                   atol: float | None = None) -> tuple[float, float]:
    """(max |difference|, tolerance) over the positions that count (mask: real tokens of LM logits); raises
    ExportMismatch naming the worst position, both values and the tolerance's origin. The tolerance follows
    the dtype `ours` was computed in (`export_tolerance`)."""
    dtype = ours.dtype
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    if ours.shape != theirs.shape:
        raise ExportMismatch(f"the export {out} does not reproduce the engine's logits: shape {tuple(theirs.shape)} "
                             f"reloaded vs {tuple(ours.shape)} in the engine")
    diff = (ours - theirs).abs()
    if mask is not None and diff.dim() == 3:  # padding positions are never used (whatever they hold)
        diff = torch.where(mask.cpu()[..., None].bool(), diff, torch.zeros_like(diff))
    scale = max(1.0, float(theirs.abs().max()))
    tol = atol if atol is not None else export_tolerance(dtype) * scale
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst <= tol:  # False for NaN too
        return worst, tol
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    what = "sample {}, position {}, token {}".format(*index) if diff.dim() == 3 else "sample {}, class {}".format(*index)
    raise ExportMismatch(
        f"the export {out}, reloaded by plain transformers, does not reproduce the engine's logits: max |difference| "
        f"{worst:.4g} at {what} (engine {float(ours[index]):.6g}, reloaded {float(theirs[index]):.6g}), tolerance "
        f"{tol:.3g} ({'given' if atol is not None else f'{where}, relative to the largest logit {scale:.3g}'}); "
        f"{int((diff > tol).sum())} of {diff.numel()} logits differ by more")



def sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int, temperature: float = 0.8,
           top_k: int = 40, top_p: float = 1.0) -> str:
    """A short generated continuation from an exported model (rank 0, after training)."""
    tok = data.load_tokenizer(str(model_dir))
    model = load_exported(model_dir, "lm")
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                         top_k=top_k, top_p=top_p, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
