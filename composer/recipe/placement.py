"""Placement of block types over a depth: pure functions on lists of names.

``even``   spreads the minority types the way Megatron-LM's hybrid allocator does
           (``megatron/core/ssm/mamba_hybrid_layer_allocation.py``): the count of each minority
           type is ``round(depth * part / sum(parts))`` (Python's round: half to even); the
           majority runs between them have equal length, with equal runs at both ends, and a
           position exactly half-way goes to the majority type. 12 layers at 3:1 give
           ``MM*MMM*MM*MM``.
``period`` repeats the unit ``majority * a, minority1 * b, ...``; ``offset`` is the index of the
           first minority layer (default: the end of the first unit). 12 layers at 3:1 give
           ``MMM*MMM*MMM*``; Jamba's "attention every 8 at offset 4" is 7:1 with offset 4.
"""
from __future__ import annotations


def _spread(slots: list[int], count: int, run: float) -> list[int]:
    """Choose ``count`` of ``slots`` with majority runs of length ``run`` between picks.

    Walks the slots with a budget ``x`` of majority slots still owed before the next pick:
    ``x`` starts at ``run``; a slot is picked when less than half a slot is owed (``x < 0.5``;
    exactly 0.5 stays majority), which adds ``run`` to the budget; otherwise ``x -= 1``.
    """
    picked, x = [], run
    for s in slots:
        if x < 0.5 and len(picked) < count:
            picked.append(s)
            x += run
        else:
            x -= 1
    return picked


def _order(parts: list[int]) -> tuple[int, list[int]]:
    """Index of the majority part (largest; first listed on ties) and the others in order."""
    major = max(range(len(parts)), key=lambda i: (parts[i], -i))
    return major, [i for i in range(len(parts)) if i != major]


def place_even(names: list[str], parts: list[int], depth: int) -> list[str]:
    """Megatron-style even placement of ``names`` in proportion ``parts`` over ``depth``.

    The first minority type is spread over the whole depth; each further minority type is
    spread over the slots still held by the majority type (Megatron-LM places MLP among the
    Mamba slots after placing attention the same way).
    """
    total = sum(parts)
    major, minors = _order(parts)
    out = [names[major]] * depth
    free = list(range(depth))
    for i in minors:
        count = round(depth * parts[i] / total)
        count = min(count, len(free))
        if count <= 0:
            continue
        if i == minors[0]:
            # count + 1 equal majority runs: the type sits strictly inside, runs at both ends
            chosen = _spread(free, count, (len(free) - count) / (count + 1))
        else:
            # later types among the majority slots, one run per pick (Megatron's MLP step)
            chosen = _spread(free, count, (len(free) - count) / count)
        for s in chosen:
            out[s] = names[i]
        taken = set(chosen)
        free = [s for s in free if s not in taken]
    return out


def place_period(names: list[str], parts: list[int], depth: int,
                 offset: int | None = None) -> list[str]:
    """Repeat the unit (majority first, then minorities in order) over ``depth``.

    ``offset`` is the layer index of the first minority layer; ``None`` keeps the unit as is
    (the minorities close each unit).
    """
    major, minors = _order(parts)
    unit = [names[major]] * parts[major]
    for i in minors:
        unit += [names[i]] * parts[i]
    period = len(unit)
    start = parts[major]  # index of the first minority inside the unit
    shift = start if offset is None else offset
    return [unit[(j - shift + start) % period] for j in range(depth)]


def repeat_to(seq: list[str], depth: int) -> list[str]:
    """``seq`` repeated (and cut) to ``depth`` entries."""
    return [seq[j % len(seq)] for j in range(depth)]
