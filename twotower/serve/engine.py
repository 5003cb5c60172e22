"""The one worker that owns the model, and its scheduler (continuous batching).

Requests become ``Job``s in a bounded queue. The worker takes the oldest job and the queued
jobs that can share its batch (the same strategy, dial and sampling: rows may differ only in
their length limit, seed and stop strings, see ``decode.row_settings``), up to ``max_batch``,
and decodes them in one call. While it runs, compatible jobs join at the next boundary (AR:
the next token; verified: the next draft; the dial: the next block), and rows that end (their
stop token or string, their limit, a client that left, a deadline) leave the batch at once
(generate/rows.py). Every row's decisions are its own and the inference is batch invariant
(model/exact.py), so each answer equals the same request run alone. Jobs of another kind wait
until the running call ends; compatible jobs queued behind them do not overtake them.

Tokens reach a job as they become final: an accepted draft run under verification, and under
the plain dial each block's committed left prefix as soon as the denoiser commits it (those
tokens never change, so they are sent before the block ends, cut exactly where the decoder's
own stopper will cut). Events go to the asyncio side through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TwoTowerError
from ..generate.ar import eos_set
from ..generate.decode import DecodeCallbacks, batch_key, decode
from ..generate.diffusion import StepEvent
from ..generate.rows import NewRow
from ..generate.settings import DecodingSettings
from ..generate.stopping import CANCELLED, Stopper
from ..generate.strategies import select
from ..generate.trace import RowTrace
from .logprobs import TokenScore, score_tokens

log = logging.getLogger(__name__)

TIMEOUT = "timeout"  # a job's finish reason when its deadline passed
EARLY_STRATEGIES = ("mask_diffusion", "fused_dial")  # committed tokens are final before the block ends


class QueueFull(Exception):
    """The queue holds max_queue jobs already."""


@dataclass
class Job:
    """One request's row: its prompt, its settings, and the events its response reads."""

    prompt_ids: list[int]
    settings: DecodingSettings
    loop: asyncio.AbstractEventLoop
    show_steps: bool = False
    logprobs: int | None = None  # None: none; else the alternatives per token (serve/logprobs.py)
    deadline: float | None = None  # time.monotonic() after which the row is ended
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    # worker side
    stopper: Stopper | None = None  # mirrors the decoder's stopper for this row (early tokens)
    trace: RowTrace | None = None
    sent: int = 0  # tokens sent to the response
    final: int = 0  # tokens the decoder has made final
    nfe: int = 0  # denoiser forwards this row took part in (AR: one a token)
    scores: list[TokenScore] = field(default_factory=list)  # of final tokens not sent yet (logprobs)
    done: bool = False

    def key(self) -> DecodingSettings:
        """What rows of one batch must share."""
        return batch_key(self.settings)

    def put(self, kind: str, payload: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, metrics=None,
                 warm_up: list[DecodingSettings] | None = None) -> None:
        """``warm_up``: settings to decode a short prompt with before the first request (the
        first forward of each shape pays one-time costs: ~10 s for SmolLM2's first dial request
        here), so that no client pays them; requests queue meanwhile."""
        self.model = model
        self.tokenizer = tokenizer
        self.warm_up = list(warm_up or [])
        self.ready = threading.Event()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.context = model.context if hasattr(model, "context") else model
        self.thread = threading.Thread(target=self._work, name="twotower-engine", daemon=True)
        self.threads = torch.get_num_threads()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Let the running batch finish, fail what is queued, and end the worker."""
        with self.lock:
            self.stopping = True
            left = list(self.queue)
            self.queue.clear()
            self.lock.notify_all()
        for job in left:
            job.put("error", (503, "the server is shutting down"))
        self.thread.join(timeout=60)

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.queue.append(job)
            self._gauge()
            self.lock.notify()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))

    def _take(self, key: DecodingSettings | None, room: int, wait: bool) -> list[Job] | None:
        """Up to ``room`` queued jobs that can share a batch: the oldest job's kind (or ``key``'s,
        the running batch's), taken from the front of the queue up to the first job of another
        kind, so that a stream of compatible jobs cannot keep an older one waiting forever.
        Jobs cancelled or past their deadline in the queue are answered here. ``wait``: block
        until there is a job (None once the engine stops)."""
        with self.lock:
            while wait and not self.queue and not self.stopping:
                self.lock.wait()
            if wait and self.stopping and not self.queue:
                return None
            now = time.monotonic()
            taken: list[Job] = []
            kept: deque[Job] = deque()
            blocked = False
            for job in self.queue:
                if job.cancelled or (job.deadline is not None and now > job.deadline):
                    job.put("error", (499, "the client left") if job.cancelled else
                            (504, "the request timed out in the queue"))
                    continue
                key = job.key() if key is None else key
                if not blocked and len(taken) < room and job.key() == key:
                    taken.append(job)
                else:
                    blocked = blocked or job.key() != key
                    kept.append(job)
            self.queue = kept
            self._gauge()
            return taken

    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # a new thread's own setting
        for settings in self.warm_up:
            try:
                decode(self.model, [[self.tokenizer.eos_token_id or 0]], settings.replace(max_new_tokens=2),
                       tokenizer=self.tokenizer)
            except Exception:  # a warm-up that fails costs the first request its time, nothing more
                log.exception("twotower serve: warm-up with %s failed", settings.strategy)
        self.ready.set()
        while True:
            jobs = self._take(None, self.max_batch, wait=True)
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _begin(self, jobs: list[Job], first_row: int) -> None:
        if not jobs:
            return
        eos = eos_set(self.context, None if jobs[0].settings.stop_token_ids is None
                      else list(jobs[0].settings.stop_token_ids))
        now = time.monotonic()
        for row, job in enumerate(jobs, start=first_row):
            job.started = now
            job.stopper = Stopper(1, job.settings.max_new_tokens, eos, job.settings.stop_strings, self.tokenizer)
            job.trace = RowTrace(row)

    def _run(self, first: list[Job]) -> None:
        """Decode ``first`` and every compatible job that joins while it runs (at the next token,
        draft or block boundary) until no row is left; the row id of a job is its index here."""
        jobs = list(first)
        key = first[0].key()
        strategy = first[0].settings.strategy
        early = strategy in EARLY_STRATEGIES
        self._begin(jobs, 0)
        self.running = list(jobs)

        def on_boundary(going_on: list[int]) -> list[NewRow]:
            room = self.max_batch - len(going_on)
            joining = self._take(key, room, wait=False) if room > 0 and not self.stopping else []
            self._begin(joining, len(jobs))
            jobs.extend(joining)
            self.running = [jobs[r] for r in going_on] + joining
            if self.metrics is not None:
                self.metrics.running.set(len(self.running))
                if self.running:
                    self.metrics.batch_size.observe(len(self.running))
                if joining:
                    self.metrics.rows_joined.inc(len(joining))
            return [NewRow(j.prompt_ids, j.settings.max_new_tokens, j.settings.seed, j.settings.stop_strings)
                    for j in joining]

        def should_stop(row: int) -> str | None:
            job = jobs[row]
            if job.cancelled:
                return CANCELLED
            if job.deadline is not None and time.monotonic() > job.deadline:
                return TIMEOUT
            return None

        def on_step(event: StepEvent) -> None:
            for row in event.rows:
                job = jobs[row]
                if job.done or not job.trace.on_step(event):
                    continue
                job.nfe += 1
                if job.show_steps:
                    job.put("step", {"block": event.block, "step": event.step,
                                     "tokens": list(job.trace.tokens), "steps": list(job.trace.steps)})
                if early:  # the block's left prefix is final: send what was not sent yet
                    prefix = job.trace.committed_prefix()
                    new = slice(job.sent - job.final, len(prefix))
                    self._send(job, prefix[new], job.trace.steps[new])

        def on_token(row: int, token: int) -> None:
            job = jobs[row]
            if job.done:
                return
            origin = job.trace.on_token(token)
            job.final += 1
            if strategy == "ar":  # one forward a token (the two-tower strategies count their steps)
                job.nfe += 1
            if job.final > job.sent:
                self._send(job, [token], [origin])

        def on_logits(row: int, tokens: list[int], logits: torch.Tensor) -> None:
            job = jobs[row]
            if job.logprobs is not None and not job.done:
                job.scores += score_tokens(tokens, logits, job.logprobs)

        if self.metrics is not None:
            self.metrics.batch_size.observe(len(jobs))
            self.metrics.running.set(len(jobs))
        scored = select(first[0].settings).scores_tokens  # (the only ones with logprobs: app.py checks)
        try:
            decode(self.model, [j.prompt_ids for j in first], [j.settings for j in first],
                   DecodeCallbacks(on_token, on_step, should_stop, on_boundary, on_logits if scored else None),
                   tokenizer=self.tokenizer)
        except TwoTowerError as e:
            self._fail(jobs, 400, str(e))
        except Exception:  # a bug: answer every row of the batch, keep serving
            log.exception("twotower serve: decoding failed")
            self._fail(jobs, 500, "internal error while decoding (see the server's log)")
        finally:
            for job in jobs:
                if not job.done:  # cancelled or timed out
                    self._end(job, CANCELLED if job.cancelled else TIMEOUT)
            self.running = []
            if self.metrics is not None:
                self.metrics.running.set(0)

    def _send(self, job: Job, tokens: list[int], origins: list[int]) -> None:
        """Tokens that are final for this row, through its own stopper (the decoder's rule), with
        the step that committed each (RowTrace's origins) for the live view."""
        if job.done or not tokens:
            return
        kept = job.stopper.extend(0, tokens)
        job.sent += len(tokens)
        scores = None
        if job.logprobs is not None:  # the scores of these tokens arrived before them (on_logits)
            scores, job.scores = job.scores[: len(kept)], job.scores[len(tokens):]
        if kept:
            job.put("tokens", (kept, scores))
            if job.show_steps:
                for token, origin in zip(kept, origins):
                    job.put("commit", {"token": token, "step": origin})
        if job.stopper.all_finished:
            self._end(job, job.stopper.reasons[0])

    @staticmethod
    def _fail(jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            if not job.done:
                job.done = True
                job.put("error", (status, message))

    def _end(self, job: Job, reason: str) -> None:
        job.done = True
        job.put("end", {"reason": reason, "tokens": list(job.stopper.tokens[0]), "nfe": job.nfe})
        if self.metrics is not None:
            self.metrics.rows_ended.labels(reason).inc()
