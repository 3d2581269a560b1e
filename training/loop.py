"""The epoch/step loop of one model: validation, best weights, early stopping, Ctrl-C."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serve.runtime.tokenizer import PAD_ID, Tokenizer
from training import checkpoint as ckpt
from training.batches import make_batches, pad_batch
from training.config import SELECT_BY
from training.corpus import Pair
from training.loss import compile_steps, itf_weights
from training.reply_metrics import make_greedy_decoder, reply_metrics
from training.summaries import SAMPLE_REPLIES, Summaries

log = logging.getLogger("training")


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved at ``step``; ``--resume`` continues from it."""

    def __init__(self, step: int, out: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {out}; "
                         f"continue with --resume")
        self.step = step


class Loop:
    """The epoch/step loop; its state lives in ``TrainingState`` so that it can resume."""

    def __init__(self, config, model, optimizer, state, out, train_data, valid_data, *,
                 tokenizer: Tokenizer, valid_texts: list[Pair]):
        self.config, self.model, self.optimizer, self.state = config, model, optimizer, state
        self.out, self.train_data, self.valid_data = out, train_data, valid_data
        self.tokenizer, self.valid_texts = tokenizer, valid_texts
        self.interrupted = False
        self.traced = False
        weights = (itf_weights([a for _, a in train_data], len(tokenizer.vocab),
                               config.itf_power) if config.itf_power else None)
        self.train_step, self.eval_step = compile_steps(
            model, optimizer, config.clip_norm, label_smoothing=config.label_smoothing,
            token_weights=weights)
        self.decoder = None  # made at the first epoch end that needs it
        self.summaries: Summaries | None = None  # OUT/tensorboard/, open while run() runs

    def validate(self) -> float:
        total, count = 0.0, 0.0
        order = sorted(range(len(self.valid_data)), key=lambda i: len(self.valid_data[i][0]))
        size = self.config.batch_size
        for start in range(0, len(order), size):
            loss_sum, n = self.eval_step(*pad_batch(self.valid_data, order[start:start + size]))
            total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)

    def replies(self) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
        """Greedy replies to the first ``eval_replies`` validation questions, measured; and
        the first ``SAMPLE_REPLIES`` of them as (question, reply, reference) for TensorBoard."""
        n = min(self.config.eval_replies, len(self.valid_data))
        if not n:
            return {}, []
        if self.decoder is None:
            self.decoder = make_greedy_decoder(self.model)
        # Sorted by length so that a batch pads little; the metrics do not depend on order.
        order = sorted(range(n), key=lambda i: len(self.valid_data[i][0]))
        replies = [""] * n
        size = self.config.batch_size
        for start in range(0, n, size):
            rows = order[start:start + size]
            for row, ids in zip(rows, self.decoder([self.valid_data[i][0] for i in rows]),
                                strict=True):
                replies[row] = self.tokenizer.decode(ids)
        samples = [(q, reply, a) for (q, a), reply
                   in zip(self.valid_texts[:SAMPLE_REPLIES], replies, strict=False)]
        return reply_metrics(replies, [a for _, a in self.valid_texts[:n]]), samples

    def save(self) -> None:
        self.state.save()
        ckpt.save_weights(self.out, self.model)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.interrupted = True

    def run(self) -> None:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.summaries = Summaries(self.out)
        try:
            self._run()
        finally:
            self.summaries.close()
            self.summaries = None
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _metrics(self, kind: str, train_loss: float | None, valid_loss: float | None,
                 tokens_per_s: float | None, extra: dict | None = None) -> None:
        record = {
            "step": int(self.state.step.numpy()),
            "epoch": 0 if kind == "start" else int(self.state.epoch.numpy()) + 1,
            "kind": kind,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "valid_ppl": math.exp(min(valid_loss, 50.0)) if valid_loss is not None else None,
            "learning_rate": float(self.optimizer.learning_rate.numpy()),
            "tokens_per_s": tokens_per_s,
            **(extra or {}),
            "time": round(time.time(), 3),
        }
        ckpt.append_metrics(self.out, record)
        if self.summaries is not None:
            self.summaries.record(record)
        if valid_loss is not None:
            replies = "".join(f", {k[6:]} {record[k]:.3f}" for k in
                              ("valid_distinct2", "valid_top10_share", "valid_bleu2")
                              if k in record)
            log.info("step %d epoch %d: train loss %s, valid loss %.4f, perplexity %.2f%s",
                     record["step"], record["epoch"],
                     "-" if train_loss is None else f"{train_loss:.4f}", valid_loss,
                     record["valid_ppl"], replies)

    def _run(self) -> None:
        from tqdm import tqdm

        cfg, state = self.config, self.state
        batches_per_epoch = len(make_batches(self.train_data, cfg.batch_size, cfg.seed, 0))
        total = cfg.epochs * batches_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        if int(state.step.numpy()) == 0:
            self._metrics("start", None, self.validate(), None)
        bar = tqdm(total=total, initial=int(state.step.numpy()), disable=not cfg.progress,
                   unit="step", dynamic_ncols=True)
        meter = _Meter()
        # A resumed run that had stopped early stays stopped (unless patience was raised).
        stop_reason = ("early stopping" if cfg.patience
                       and int(state.bad_epochs.numpy()) >= cfg.patience else None)
        try:
            while int(state.epoch.numpy()) < cfg.epochs and stop_reason is None:
                stop_reason = self._train_epoch(deadline, bar, meter)
                if stop_reason is None:
                    stop_reason = self._end_epoch(meter.loss(), meter.rate())
                    meter.new_epoch()
            bar.close()
            partial_epoch = int(state.batch_in_epoch.numpy()) != 0
            if partial_epoch and stop_reason != "interrupted":  # Ctrl-C must be quick
                # The end of a partial epoch: measure, without touching early stopping.
                self._metrics("end", meter.loss(), self.validate(), meter.rate())
            self.save()
        finally:
            bar.close()
        if stop_reason == "interrupted":
            raise TrainingInterrupted(int(state.step.numpy()), self.out)
        log.info("stopped at step %d: %s; checkpoint in %s", int(state.step.numpy()),
                 stop_reason or "all epochs done", self.out)

    def _train_epoch(self, deadline: float | None, bar, meter: _Meter) -> str | None:
        """The rest of the current epoch's batches; a reason to stop, or None at its end."""
        cfg, state = self.config, self.state
        epoch = int(state.epoch.numpy())
        batches = make_batches(self.train_data, cfg.batch_size, cfg.seed, epoch)
        for index in range(int(state.batch_in_epoch.numpy()), len(batches)):
            stop_reason = self._stop_reason(deadline)
            if stop_reason:
                return stop_reason
            src, src_len, tgt_in, tgt_out = pad_batch(self.train_data, batches[index])
            t0 = time.perf_counter()
            loss = float(self.train_step(src, src_len, tgt_in, tgt_out))
            if self.traced:  # the first call of a process traces: not throughput
                meter.busy += time.perf_counter() - t0
                meter.tokens += int(src_len.sum()) + int((tgt_out != PAD_ID).sum())
            self.traced = True
            state.step.assign_add(1)
            state.batch_in_epoch.assign(index + 1)
            meter.loss_sum, meter.loss_steps = meter.loss_sum + loss, meter.loss_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{meter.rate() or 0:.0f}",
                            epoch=epoch + 1, refresh=False)
            if int(state.step.numpy()) % cfg.checkpoint_every == 0:
                self._metrics("checkpoint", meter.loss(), None, meter.rate())
                self.save()
        return None

    def _stop_reason(self, deadline: float | None) -> str | None:
        if self.interrupted:
            return "interrupted"
        if self.config.max_steps and int(self.state.step.numpy()) >= self.config.max_steps:
            return f"max_steps {self.config.max_steps} reached"
        if deadline is not None and time.monotonic() >= deadline:
            return f"max_minutes {self.config.max_minutes:g} reached"
        return None

    def _select(self, figures: dict) -> bool:
        """Whether this epoch's weights become best.weights.h5 (by ``select_by``)."""
        name = self.config.select_by
        if name == "valid_loss":
            return figures["valid_loss"] < float(self.state.best_valid_loss.numpy())
        score = figures[name] if SELECT_BY[name] == "lower" else -figures[name]
        if score < float(self.state.best_selected.numpy()):
            self.state.best_selected.assign(score)
            return True
        return False

    def _end_epoch(self, train_loss: float | None, tokens_per_s: float | None) -> str | None:
        """Validate, choose the best weights, early-stop, decay SGD's rate on a plateau."""
        cfg, state = self.config, self.state
        valid_loss = self.validate()
        reply_figures, samples = self.replies() if cfg.eval_replies else ({}, [])
        figures = {"valid_loss": valid_loss, **reply_figures}
        selected = self._select(figures)
        self._metrics("epoch", train_loss, valid_loss, tokens_per_s,
                      {**figures, "selected": selected})
        if self.summaries is not None:
            self.summaries.samples(int(state.step.numpy()), samples)
        if selected:
            ckpt.save_weights(self.out, self.model, ckpt.BEST_WEIGHTS_FILE)
        if valid_loss < float(state.best_valid_loss.numpy()):  # early stopping: valid_loss
            state.best_valid_loss.assign(valid_loss)
            state.bad_epochs.assign(0)
        else:
            state.bad_epochs.assign_add(1)
            if cfg.optimizer == "sgd":
                lr = self.optimizer.learning_rate
                lr.assign(lr * cfg.lr_decay)
        state.epoch.assign_add(1)
        state.batch_in_epoch.assign(0)
        self.save()
        if cfg.patience and int(state.bad_epochs.numpy()) >= cfg.patience:
            return "early stopping"
        return None


@dataclass
class _Meter:
    """Training loss and throughput since the last epoch end (or the start of the process)."""

    loss_sum: float = 0.0
    loss_steps: int = 0
    tokens: int = 0
    busy: float = 0.0

    def loss(self) -> float | None:
        return self.loss_sum / self.loss_steps if self.loss_steps else None

    def rate(self) -> float | None:
        return _rate(self.tokens, self.busy)

    def new_epoch(self) -> None:
        self.loss_sum, self.loss_steps = 0.0, 0


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second: source plus target tokens, padding excluded."""
    return tokens / seconds if seconds > 0 else None
