"""Host-side global scheduler: which items-shard serves each request.

Requests wait in a bounded queue (`submit` refuses when it is full: the server answers 503). The
engine loop takes a scheduling window (everything queued, up to `window` requests) and assigns it:

  affinity      For each request, `need[s]` = bytes of its cached item blocks that shard s holds;
                its affinity to s = need[s] / sum(need). Requests are placed in order of their
                best affinity (most shard-bound first, ties by arrival); each goes to the shard of
                highest affinity that has taken fewer than cap = ceil(window size / shards x
                (1 + slack)) requests of this window, ties to the shard that has taken fewer,
                then the lower index; so no shard takes more than its share of a window while
                others idle.
  round_robin   Request i of the stream goes to shard i mod N (ignores where blocks live).

Each shard's share of a window is one batch, run in arrival order; every request keeps its
bucketed shapes, so compiles stay bounded by (shape buckets x shards). The serving loop runs a
window's batches to completion before it takes the next window, so no request is in flight
when a window is assigned. Launchers that route a request stream without a server use
`route`, the same rule one request at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
from concurrent.futures import Future

import numpy as np

SCHEDULERS = ("affinity", "round_robin")
# how the engine loop runs a window: one serving step per shard batch, or one request at a time
SERVING_STEPS = ("batched", "serial")


class QueueFull(RuntimeError):
    """The request queue is at its bound: retry later."""


@dataclasses.dataclass
class Task:
    kind: str  # "rank" | "event" | "call"
    payload: object
    need: np.ndarray | None = None  # [N] item-cache bytes per shard (rank)
    seq: int = 0
    enqueued: float = 0.0
    future: Future = dataclasses.field(default_factory=Future)
    shard: int | None = None
    cost: float = 0.0  # estimated engine seconds (admission under `Scheduler.max_cost_s`)


class Scheduler:
    def __init__(self, num_shards: int, policy: str = "affinity", max_queue: int = 256, window: int = 32,
                 slack: float = 0.25, max_cost_s: float | None = None):
        """max_queue: tasks waiting at most; window: tasks the engine loop takes at once. max_cost_s:
        also at most this many estimated engine seconds (`Task.cost`) waiting (a task is always taken
        into an empty queue), so a window taken from the queue holds no more either: a request that must compute a new
        user's history prefix costs ~10x a returning user's, so a count bound sized for returning
        users lets new users wait many times the latency target. None: counts only."""
        if policy not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {policy!r}: {' | '.join(SCHEDULERS)}")
        if max_queue < 1 or window < 1:
            raise ValueError("max_queue and window must be >= 1")
        if max_cost_s is not None and not max_cost_s > 0:
            raise ValueError("max_cost_s must be > 0")
        self.num_shards, self.policy, self.max_queue, self.window, self.slack = num_shards, policy, max_queue, window, slack
        self.max_cost_s, self.queued_cost = max_cost_s, 0.0
        self.queue: collections.deque[Task] = collections.deque()
        self.cv = threading.Condition()
        self._seq = itertools.count()
        self._rr = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, task: Task) -> Task:
        with self.cv:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"request queue full ({self.max_queue} waiting)")
            if self.max_cost_s is not None and self.queue and self.queued_cost + task.cost > self.max_cost_s:
                raise QueueFull(f"request queue full (about {self.queued_cost:.1f}s of engine time waiting)")
            task.seq = next(self._seq)
            self.queue.append(task)
            self.queued_cost += task.cost
            self.cv.notify()
        return task

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def next_window(self, timeout: float | None = None) -> list[Task]:
        """Up to `window` queued tasks (waits up to `timeout` for the first one)."""
        with self.cv:
            if not self.queue and not self.closed:
                self.cv.wait(timeout)
            out = []
            while self.queue and len(out) < self.window:
                out.append(self.queue.popleft())
            self.queued_cost = sum(t.cost for t in self.queue) if self.queue else 0.0  # (no float drift)
            return out

    def assign(self, tasks: list[Task]) -> dict[int, list[Task]]:
        """Shard -> its batch (arrival order) for the rank tasks of one window."""
        n = self.num_shards
        batches: dict[int, list[Task]] = {s: [] for s in range(n)}
        if self.policy == "round_robin":
            for t in tasks:
                t.shard = self._rr % n
                self._rr += 1
        else:
            cap = math.ceil(len(tasks) / n * (1 + self.slack))
            shares = [t.need / t.need.sum() if t.need is not None and t.need.sum() > 0 else np.full(n, 1.0 / n)
                      for t in tasks]
            order = sorted(range(len(tasks)), key=lambda i: (-shares[i].max(), tasks[i].seq))
            taken = np.zeros(n, np.int64)
            for i in order:
                open_ = [s for s in range(n) if taken[s] < cap] or list(range(n))
                best = max(open_, key=lambda s: (shares[i][s], -taken[s], -s))
                tasks[i].shard = best
                taken[best] += 1
        for t in sorted(tasks, key=lambda t: t.seq):
            batches[t.shard].append(t)
        return {s: b for s, b in batches.items() if b}

    def route(self, need) -> int:
        """The shard for one request (need: [N] its item bytes per shard), as a window of one."""
        t = Task("rank", None, need=np.asarray(need, np.int64))
        self.assign([t])
        return t.shard
