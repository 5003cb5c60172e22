"""Text-quality metrics on token sequences: agreement with a reference decoding, distinct-n
and repetition (degenerate text shows up as low distinct-n and high repetition)."""

from __future__ import annotations

from collections.abc import Sequence


def token_agreement(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of reference positions where the candidate has the same token (position by
    position; a shorter candidate counts its missing positions as disagreements)."""
    if not reference:
        return 1.0 if not candidate else 0.0
    same = sum(1 for a, b in zip(candidate, reference) if a == b)
    return same / max(len(reference), len(candidate))


def prefix_agreement(candidate: Sequence[int], reference: Sequence[int]) -> int:
    """Length of the common prefix: how long the two decodings stay identical."""
    n = 0
    for a, b in zip(candidate, reference):
        if a != b:
            break
        n += 1
    return n


def exact_match(candidate: Sequence[int], reference: Sequence[int]) -> bool:
    return list(candidate) == list(reference)


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Unique n-grams / all n-grams of one sequence (1.0 when it has none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the sequence."""
    seen: set[tuple[int, ...]] = set()
    repeats = total = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeats += gram in seen
        seen.add(gram)
        total += 1
    return repeats / total if total else 0.0
