"""`genflow serve --shadow`: the challenger runs beside the champion on a sample of real requests.

The answer is always the champion's. After it is sent, a sampled request is run again on the
challenger (its own version table, followed like the champion's) on a thread of its own, at
most one at a time per model (a request arriving while one runs is not shadowed: shadow work
never queues). /metrics gets the challenger's latency per version, and for causal text models
the likelihood each model assigns to the other's text (nats per generated character):

    genflow_serve_shadow_seconds{model, version}
    genflow_serve_shadow_nll_per_char{model, scorer="champion", author="challenger"}   (and back)
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from prometheus_client import Counter, Histogram

from components.inference import CausalLMEngine
from components.serving.follow import Follower, one_line
from components.serving.generate import Limits, plan, run_jobs
from components.serving.metrics import ServeMetrics
from components.serving.models import Served

log = logging.getLogger("genflow.serve")
CHALLENGER = "challenger"
NLL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def text_nll(engine: CausalLMEngine, prompt: str, text: str) -> Optional[float]:
    """Mean negative log-likelihood (nats per character) `engine` assigns to what follows `prompt`
    in `text`; the last block_size characters are scored. None when nothing was generated."""
    tok = engine.tokenizer
    lead = "" if prompt else ("\n" if "\n" in tok.stoi else tok.vocab[0])  # sample_text's start of text
    ids = tok.encode(lead + text)                                            # unknown characters: unk_id
    start = len(tok.encode(lead + prompt))
    if len(ids) <= start or len(ids) < 2:
        return None
    window = ids[-(engine.block_size + 1):]                                  # inputs + the last target
    first_target = max(1, start - (len(ids) - len(window)))                  # index in window
    logits, _ = engine.forward(window[None, :-1], engine.empty_past(1))      # (1, T, V)
    z = logits[0].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = window[1:]
    nll = -logp[np.arange(len(targets)), targets]                            # (T,)
    return float(nll[first_target - 1:].mean())


@dataclass
class ShadowStats:
    requests: int = 0
    skipped: int = 0
    last_error: Optional[str] = None
    last_ms: Optional[float] = None
    nll: dict = field(default_factory=dict)  # "champion_on_challenger" / "challenger_on_champion" -> last value


class Shadow:
    """Runs sampled requests on the challenger; every outcome goes to /metrics and stats."""

    def __init__(self, follower: Follower, metrics: ServeMetrics, limits: Limits, fraction: float, seed: int = 0):
        self.follower, self.table, self.limits, self.fraction = follower, follower.table, limits, fraction
        self._rng = random.Random(seed)
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.stats: dict[str, ShadowStats] = {}
        r = metrics.registry
        self.latency = Histogram("genflow_serve_shadow_seconds", "Challenger latency on shadowed requests",
                                 ["model", "version"], registry=r)
        self.count = Counter("genflow_serve_shadow_requests", "Requests shadowed, by outcome",
                             ["model", "outcome"], registry=r)
        self.nll = Histogram("genflow_serve_shadow_nll_per_char", "Nats per character one model assigns to the "
                             "other's text (causal text models)", ["model", "scorer", "author"],
                             buckets=NLL_BUCKETS, registry=r)

    def maybe(self, champion: Served, body: Any, job_kind: str, outputs: list[str]) -> None:
        """After a champion answer: shadow it on the challenger with probability `fraction`."""
        name = champion.name
        if self.fraction <= 0 or self._rng.random() >= self.fraction:
            return
        challenger = self.table.get(name)
        if challenger is None or challenger.version == champion.version:
            return
        stats = self.stats.setdefault(name, ShadowStats())
        if name in self._busy:
            stats.skipped += 1
            self.count.labels(name, "skipped").inc()
            return
        self._busy.add(name)
        task = asyncio.get_running_loop().create_task(self._run(champion, challenger, body, job_kind, outputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, champion: Served, challenger: Served, body: Any, kind: str, outputs: list[str]) -> None:
        name, stats = champion.name, self.stats[champion.name]
        try:
            started = time.perf_counter()
            job = plan(challenger.engine, body, self.limits)
            theirs = (await asyncio.to_thread(run_jobs, challenger.engine, [job]))[0]
            took = time.perf_counter() - started
            self.latency.labels(name, challenger.version).observe(took)
            stats.requests, stats.last_ms, stats.last_error = stats.requests + 1, round(took * 1000, 2), None
            self.count.labels(name, "ok").inc()
            both_causal = isinstance(champion.engine, CausalLMEngine) and isinstance(challenger.engine, CausalLMEngine)
            if kind == "texts" and both_causal:
                prompt = body.get("prompt") if isinstance(body, dict) else None
                prompt = prompt if prompt is not None else champion.engine.defaults.get("prompt", "")
                await asyncio.to_thread(self._score, name, champion, challenger, prompt, outputs, theirs)
        except Exception as e:  # the challenger's failures are reported, never the client's problem
            stats.last_error = f"version {challenger.version}: {one_line(e)}"
            self.count.labels(name, "failed").inc()
            log.warning("%s: shadow request on challenger %s failed: %s", name, challenger.version, one_line(e))
        finally:
            self._busy.discard(name)

    def _score(self, name: str, champion: Served, challenger: Served, prompt: str, ours: list[str],
               theirs: list[str]) -> None:
        stats = self.stats[name]
        for scorer, author, texts, label in ((champion, challenger, theirs, "champion_on_challenger"),
                                             (challenger, champion, ours, "challenger_on_champion")):
            values = [v for v in (text_nll(scorer.engine, prompt, t) for t in texts) if v is not None]
            if values:
                value = float(np.mean(values))
                self.nll.labels(name, "champion" if scorer is champion else "challenger",
                                "challenger" if author is challenger else "champion").observe(value)
                stats.nll[label] = round(value, 4)

    def describe(self, name: str) -> Optional[dict]:
        challenger, stats = self.table.get(name), self.stats.get(name, ShadowStats())
        state = self.follower.states.get(name)
        return {"alias": CHALLENGER, "version": challenger.version if challenger else None,
                "fraction": self.fraction, "requests": stats.requests, "skipped": stats.skipped,
                "last_ms": stats.last_ms, "last_error": stats.last_error, "nll_per_char": dict(stats.nll),
                "last_swap_error": state.last_swap_error if state else None}

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
