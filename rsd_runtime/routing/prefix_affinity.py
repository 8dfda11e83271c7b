"""prefix-affinity: requests that share a prompt prefix go to the worker that likely caches it.

After SGLang's cache-aware router. The router keeps, per worker, an
approximate tree of the prompts it sent there (token ids, or characters when it
has no tokenizer), bounded in size with the oldest prompts evicted first. For
each request:

1. If the load is imbalanced, go to the worker with the fewest requests in
   flight. Imbalanced means max - min > ``balance_abs_threshold`` and
   max > ``balance_rel_threshold`` x min (SGLang's defaults: 32 and 1.0001,
   i.e. any real imbalance once it exceeds 32 requests).
2. Otherwise find the worker whose tree shares the longest prefix with the
   prompt. If that prefix is more than ``cache_threshold`` (default 0.5) of
   the prompt, go there.
3. Otherwise go to the worker with the smallest tree (the most room to cache
   something new); ties by fewest requests in flight, then worker order.
"""
from __future__ import annotations

from collections import OrderedDict

from rsd_runtime.routing.base import Policy, RouteRequest, WorkerState


class _Tree:
    """A worker's prompts as a trie of tokens, bounded: ``size`` counts nodes; the oldest prompts go
    first. A node is a dict of children; the key ``_END`` counts the kept prompts that end there."""

    def __init__(self, max_nodes: int):
        self.root: dict = {}
        self.size = 0
        self.max_nodes = max_nodes
        self._prompts: OrderedDict = OrderedDict()  # prompt -> how many times kept, oldest first

    def match(self, key) -> int:
        node, n = self.root, 0
        for t in key:
            node = node.get(t)
            if node is None:
                break
            n += 1
        return n

    def insert(self, key) -> None:
        if not key:
            return
        self._prompts[key] = self._prompts.get(key, 0) + 1
        self._prompts.move_to_end(key)
        node = self.root
        for t in key:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                self.size += 1
            node = nxt
        node[_END] = node.get(_END, 0) + 1
        while self.size > self.max_nodes and len(self._prompts) > 1:
            self._remove(next(iter(self._prompts)))

    def _remove(self, key) -> None:
        """Forget the oldest copy of a prompt: prune the nodes no kept prompt needs any more."""
        count = self._prompts.pop(key)
        path, node = [], self.root
        for t in key:
            path.append((node, t))
            node = node[t]
        node[_END] -= count
        if not node[_END]:
            del node[_END]
        for parent, t in reversed(path):
            if parent[t]:  # children, or a prompt ending here
                break
            del parent[t]
            self.size -= 1


_END = object()


class PrefixAffinity(Policy):
    name = "prefix-affinity"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.0001, max_tree_size: int = 1 << 20):
        if not 0 <= cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.trees: dict[str, _Tree] = {}

    def _tree(self, worker: WorkerState) -> _Tree:
        tree = self.trees.get(worker.name)
        if tree is None:
            tree = self.trees[worker.name] = _Tree(self.max_tree_size)
        return tree

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> int:
        ok = self.healthy(workers)
        loads = [workers[i].outstanding for i in ok]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return min(ok, key=lambda i: (workers[i].outstanding, i))
        key = req.key
        matches = {i: self._tree(workers[i]).match(key) for i in ok}
        best = max(ok, key=lambda i: (matches[i], -workers[i].outstanding, -i))
        if key and matches[best] / len(key) > self.cache_threshold:
            return best
        return min(ok, key=lambda i: (self._tree(workers[i]).size, workers[i].outstanding, i))

    def on_dispatch(self, req: RouteRequest, worker: WorkerState) -> None:
        self._tree(worker).insert(req.key)
