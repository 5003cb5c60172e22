"""Verified tree drafts: the context tower checks several continuations of a draft at once.

The denoiser drafts a block in one forward, one distribution per target slot. A chain checks
only the likeliest token of each slot, and its second slot, predicted without seeing the first
target, is rejected more often than not (shipped denoiser, SmolLM2: 84% of first slots kept,
then 40%, 26%, 14% of the next ones). A tree spends the same check rows better: its ``nodes``
tokens are the continuations with the highest probability under the drafter's per-slot
distributions (a slot's second choice after a likely first slot is worth more than a fourth
slot), chosen best-first as in EAGLE-2 and Medusa's trees. The context tower runs the anchor and
every node in one pass, each node seeing its ancestors only (``append_context``'s ``tree``),
so each node's logits are bitwise those of its path run as a sequence (model/exact.py). Then
the AR model picks its token at the anchor; while the pick is a child of the current node the
walk goes down to it; its first pick that no child holds ends the step. The output is the AR
model's token for token: greedy, its argmax; sampling, one draw per emitted token from the
row's own stream, exactly as ``generate_ar`` draws them, so the same seed gives the same text.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """A batch of token trees over [anchor, node 1, ..., node N] (the pass's rows 0..N)."""

    tokens: torch.Tensor  # (B, N) each node's token; parents come before their children
    parents: torch.Tensor  # (B, N) each node's parent row: 0 the anchor, i node i
    depths: torch.Tensor  # (B, N) 1 for the anchor's children
    ranks: list[list[tuple[int, ...]]]  # per row, each node's path as ranks of its slots' candidates

    @property
    def nodes(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> torch.Tensor:
        """(B, N + 1, N + 1) bool: row i sees row j (j an ancestor of i, or i itself)."""
        return ancestors(self.parents)

    def children(self, row: int) -> dict[tuple[int, int], int]:
        """(parent row, token) -> child row, for one batch row."""
        return {(p, t): i + 1 for i, (p, t) in enumerate(zip(self.parents[row].tolist(), self.tokens[row].tolist()))}

    def top_chain(self) -> torch.Tensor:
        """(B, S') bool over the block's slots: those whose likeliest candidate is on the tree
        along the likeliest path (what a chain would have drafted: for step callbacks)."""
        depth = max((len(r) for rows in self.ranks for r in rows), default=0)
        chain = torch.zeros(len(self.ranks), depth, dtype=torch.bool)
        for b, rows in enumerate(self.ranks):
            on = set(rows)
            for d in range(depth):
                if (0,) * (d + 1) not in on:
                    break
                chain[b, d] = True
        return chain


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """The (B, N + 1, N + 1) bool ancestor rows of trees over [anchor, node 1, ..., node N] given
    each node's parent row (B, N), parents before their children: row i sees row j where j is
    an ancestor of i or i itself."""
    batch, n = parents.shape
    seen = torch.eye(n + 1, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    seen[:, 1:, 0] = True
    for i in range(1, n + 1):  # parents come first, so their rows are complete
        seen[:, i] |= seen[torch.arange(batch), parents[:, i - 1]]
    return seen


def draft_tree(logits: torch.Tensor, nodes: int) -> DraftTree:
    """The ``nodes`` likeliest continuations of each row's block (B, S, V): a path's score is
    the sum of its slots' log-probabilities, each slot scored on its own (the drafter's
    distributions are per slot). Enumerated best-first: a node's first child and its next
    sibling enter the queue when it leaves, so every candidate is scored once and nodes leave
    in order of score, parents before their children. The pass takes the likeliest path first
    (its nodes see their ancestors in key order), then the rest in that order."""
    batch, slots, vocab = logits.shape
    width = min(nodes, vocab)
    top = logits.float().log_softmax(-1).topk(width, dim=-1)  # (B, S, width), sorted
    scores, candidates = top.values.tolist(), top.indices.tolist()
    tokens, parents, depths, ranks = [], [], [], []
    for b in range(batch):
        lp, chosen, index = scores[b], [], {}
        queue = [(-lp[0][0], (0,))]
        while queue and len(chosen) < nodes:
            cost, path = heapq.heappop(queue)
            index[path] = len(chosen) + 1
            chosen.append(path)
            depth, rank = len(path), path[-1]
            if depth < slots:
                heapq.heappush(queue, (cost - lp[depth][0], (*path, 0)))
            if rank + 1 < width:
                heapq.heappush(queue, (cost + lp[depth - 1][rank] - lp[depth - 1][rank + 1], (*path[:-1], rank + 1)))
        chain = [p for p in chosen if not any(p)]  # the likeliest path first: its nodes see their keys in
        chosen = chain + [p for p in chosen if any(p)]  # key order, only the others need compacting (exact.py)
        index = {p: i + 1 for i, p in enumerate(chosen)}
        tokens.append([candidates[b][len(p) - 1][p[-1]] for p in chosen])
        parents.append([index.get(p[:-1], 0) for p in chosen])
        depths.append([len(p) for p in chosen])
        ranks.append(chosen)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=logits.device)  # noqa: E731
    return DraftTree(as_long(tokens), as_long(parents), as_long(depths), ranks)


def walk(tree: DraftTree, row: int, pick: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """One row's accepted path: ``pick(r)`` is the AR model's token after pass row r (its
    argmax, or its draw). From the anchor, go down to the child that holds the pick while there
    is one. Returns the emitted tokens (the path's tokens, then the first pick no child held)
    and the pass rows whose logits chose each of them (the anchor's first)."""
    children = tree.children(row)
    at, tokens, rows = 0, [], []
    while True:
        token = pick(at)
        tokens.append(token)
        rows.append(at)
        child = children.get((at, token))
        if child is None:
            return tokens, rows
        at = child
