"""Exact per-grade quotas for the patient-safe split (``--split-quota floor``).

The greedy of :func:`pipeline.split.assign_splits` lands every split within a photo or two
of its share of each grade. Some works state their split exactly: the Pisa CIDL report's
90/10 validation set is 2580/244/529/87/70 photos of grades 0-4 on the Kaggle labels,
which is ``floor(0.1 x n)`` of each grade. With ``quota="floor"`` every split but the first
gets exactly ``floor(fraction x n_grade)`` photos of each grade, the first split the rest.

The repair starts from the greedy's assignment and moves whole patients (both eyes
together) between splits until every (split, grade) count is its quota:

1. Local search on the patients' eye-grade vectors ("types": (0, 0), (0, 2), ...): the
   smallest combination of moves (one patient, or up to four between a split and the
   first: a swap, say) that lowers the total deviation sum |count - quota|, the best of
   that size, until it is 0; where no combination lowers it, a seeded random walk of
   moves and swaps that never raise it (crossing the plateaus of many patients with many
   photos each). The patient moved is the one of its type and split placed last by the
   seeded greedy, so the result is deterministic for a seed.
2. If that stalls: a divisor check (every patient has 0 or 2 photos of grade 0, a split
   needs an odd number: impossible at any size), then, where the quotas are small (tiny
   data sets), an exact search over how many patients of each type each split holds: it
   finds an exact split when there is one, or proves there is none.

Patients kept by an earlier version (``fixed``) are never moved. When no exact split is
found, :class:`QuotaError` names the split and grade that is furthest off.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from pipeline.sources import LabelError

QUOTAS = ("floor",)
_EXACT_MAX_STATES = 50_000  # the exact search gives up beyond this many count states
_EXACT_MAX_WORK = 300_000  # ... or this many (state, share) pairs in all (~10 us each)
_COMBOS_MAX = 300_000  # the local search tries combinations of up to this many moves


class QuotaError(LabelError):
    """No patient-safe split meets the quotas (these labels cannot give one): one line."""


def quotas(frac: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """split x grade quotas: floor(fraction x n) for every split but the first, which gets
    the rest. (Rounded to 9 places first: 0.29 x 100 is 28.999999999999996 in floats.)"""
    q = np.array([[math.floor(round(f * n, 9)) for n in totals] for f in frac], int)
    q[0] = totals - q[1:].sum(axis=0)
    return q


def repair(counts: np.ndarray, choice: np.ndarray, fixed: np.ndarray, order: np.ndarray,
           frac: np.ndarray, names: list[str], quota: str) -> np.ndarray:
    """The greedy's ``choice`` (patient -> split index) changed, moving whole patients,
    so that every (split, grade) count meets ``quota``. Raises QuotaError.

    ``counts``: patient x grade photos; ``fixed``: patients that must not move;
    ``order``: the greedy's seeded order of the patients it placed."""
    if quota not in QUOTAS:
        raise ValueError(f"unknown split quota {quota!r} (one of: none, {', '.join(QUOTAS)})")
    n_splits = len(names)
    q = quotas(frac, counts.sum(axis=0))
    choice = choice.copy()
    if n_splits == 1:
        return choice
    types, type_of = np.unique(counts, axis=0, return_inverse=True)
    type_of = type_of.ravel()
    # Movable patients of each (split, type), the greedy's last-placed at the end.
    stacks = [[[] for _ in types] for _ in range(n_splits)]
    for i in order:
        if not fixed[i]:
            stacks[choice[i]][type_of[i]].append(int(i))
    avail = np.array([[len(st) for st in row] for row in stacks], int)  # split x type
    current = np.zeros_like(q)
    np.add.at(current, choice, counts)

    room = q - (current - avail @ types)  # the quotas less what kept patients hold
    barred = _divisor_bars(types, avail, room)  # impossible at any size: no random walk
    target, dev = _aggregate_search(types, avail, current - q, walk=not barred)
    if np.abs(dev).sum():
        exact = False if barred else _exact_search(types, room, avail)
        if exact is None or exact is False:
            _refuse(dev, q, frac, counts.sum(axis=0), names, proved=exact is False)
        target = exact
    # Realise the per-(split, type) targets: patients from splits over to splits under.
    for t in range(len(types)):
        over = [s for s in range(n_splits) if avail[s, t] > target[s, t]]
        under = [s for s in range(n_splits) if avail[s, t] < target[s, t]]
        for a in over:
            for _ in range(avail[a, t] - target[a, t]):
                b = next(s for s in under if avail[s, t] < target[s, t])
                i = stacks[a][t].pop()
                stacks[b][t].append(i)
                choice[i] = b
                avail[a, t] -= 1
                avail[b, t] += 1
    return choice


def _aggregate_search(types, avail, dev, max_steps: int = 10_000, walk: bool = True):
    """Local search on the split x type counts, one split at a time against the first
    (which gets the rest: it is exact once the others are). Returns (split x type counts,
    deviation from the quotas) where it stopped: the deviation is 0, or no combination of
    up to four moves between a split and the first lowers it."""
    avail = avail.copy()
    dev = dev.copy()
    n_types = len(types)
    # The moves of a stage: a patient of type t into split s from the first, or out of it.
    sign = np.array([1] * n_types + [-1] * n_types)
    kind = np.concatenate([np.arange(n_types)] * 2)
    effect = sign[:, None] * types[kind]  # move x grade: the change of split s's counts
    levels = []
    for size in (1, 2, 3, 4):
        if math.comb(len(kind) + size - 1, size) > _COMBOS_MAX:
            break
        combos = np.array(list(itertools.combinations_with_replacement(
            range(len(kind)), size)), int).reshape(-1, size)
        uses = (combos[:, :, None] == combos[:, None, :]).sum(axis=2)
        levels.append((combos, uses, effect[combos].sum(axis=1)))
    for s in range(1, len(avail)):
        for _ in range(max_steps):
            l1 = np.abs(dev[s]).sum()
            if l1 == 0:
                break
            # A move needs a movable patient of its type where it comes from, once per use.
            have = np.concatenate([avail[0], avail[s]])
            best = None
            for combos, uses, change in levels:
                ok = (have[combos] >= uses).all(axis=1)
                after = np.where(ok, np.abs(dev[s][None] + change).sum(axis=1), l1)
                k = int(np.argmin(after))  # the first best: deterministic
                if after[k] < l1:
                    best = combos[k]
                    break
            if best is None:  # a local minimum: walk the plateau at random, then go on
                if walk and _random_walk(types, avail, dev, s):
                    break
                return avail, dev
            for m in best:
                a, b = (0, s) if sign[m] > 0 else (s, 0)
                avail[a, kind[m]] -= 1
                avail[b, kind[m]] += 1
                dev[a] -= types[kind[m]]
                dev[b] += types[kind[m]]
    return avail, dev


def _random_walk(types, avail, dev, s: int, steps: int = 50_000) -> bool:
    """Random moves and swaps of patients between split ``s`` and the first that never raise
    split ``s``'s deviation (sideways steps cross the plateaus the best-first search stops
    on, as with many patients of many photos each). Changes ``avail``/``dev`` in place;
    True when split ``s`` meets its quotas. Seeded: deterministic."""
    rng = np.random.default_rng(0)
    l1 = int(np.abs(dev[s]).sum())
    for _ in range(steps):
        if l1 == 0:
            return True
        into = rng.integers(len(types)) if rng.random() < 0.9 else -1  # -1: no patient
        out = rng.integers(len(types)) if rng.random() < 0.9 or into < 0 else -1
        if (into >= 0 and avail[0, into] == 0) or (out >= 0 and avail[s, out] == 0):
            continue
        change = (types[into] if into >= 0 else 0) - (types[out] if out >= 0 else 0)
        after = int(np.abs(dev[s] + change).sum())
        if after > l1:
            continue
        for t, a, b in ((into, 0, s), (out, s, 0)):
            if t >= 0:
                avail[a, t] -= 1
                avail[b, t] += 1
                dev[a] -= types[t]
                dev[b] += types[t]
        l1 = after
    return l1 == 0


def _divisor_bars(types, avail, room) -> bool:
    """True if some split's room for a grade is no multiple of what every movable patient
    holds of that grade (say, every patient has 0 or 2 photos of grade 0 and a split needs
    an odd number): then no split meets the quotas, however large the data."""
    for g in range(types.shape[1]):
        d = math.gcd(*(int(c) for c in types[avail.sum(axis=0) > 0, g]))
        if (d == 0 and room[:, g].any()) or (d > 1 and (room[:, g] % d).any()):
            return True
    return False


def _exact_search(types, room, prefer):
    """How many movable patients of each type each split gets so that every split but the
    first receives exactly ``room`` (split x grade: quota less what unmovable patients
    hold). Returns the split x type counts, False when there is none (proved), or None
    when the search grows too large (_EXACT_MAX_STATES, _EXACT_MAX_WORK)."""
    n_splits, n_types = prefer.shape
    if (room < 0).any():
        return False
    rest = room[1:]
    total = prefer.sum(axis=0)
    # Dynamic programme over types; a state is what splits 1.. hold so far (split 0 gets
    # the rest, which then meets its quota too, the totals being equal).
    layers = [{tuple(np.zeros(rest.size, int)): None}]
    work = 0
    for t in range(n_types):
        # Ways to share the patients of type t over splits 1.., nearest the greedy first.
        most = [min([total[t]] + [r // c for r, c in zip(row, types[t], strict=True) if c])
                for row in rest]
        if math.prod(m + 1 for m in most) > _EXACT_MAX_STATES:
            return None
        ways = [w for w in itertools.product(*(range(m + 1) for m in most))
                if sum(w) <= total[t]]
        work += len(layers[-1]) * len(ways)
        if work > _EXACT_MAX_WORK:
            return None
        ways.sort(key=lambda w: (sum(abs(x - p) for x, p in zip(w, prefer[1:, t], strict=True)), w))
        nxt: dict = {}
        for state in layers[-1]:
            s = np.array(state).reshape(rest.shape)
            for w in ways:
                new = s + np.outer(w, types[t])
                if (new <= rest).all():
                    nxt.setdefault(tuple(new.ravel()), (state, w))
            if len(nxt) > _EXACT_MAX_STATES:
                return None
        if not nxt:
            return False
        layers.append(nxt)
    final = tuple(rest.ravel())
    if final not in layers[-1]:
        return False
    out = np.zeros((n_splits, n_types), int)
    state = final
    for t in range(n_types - 1, -1, -1):
        state, w = layers[t + 1][state]
        out[1:, t] = w
        out[0, t] = total[t] - sum(w)
    return out


def _photos(n) -> str:
    return f"{n} photo" + ("" if n == 1 else "s")


def _refuse(dev, q, frac, totals, names, proved: bool):
    """QuotaError naming the (split, grade) furthest from its quota."""
    later = np.abs(dev[1:]).max() if len(names) > 1 else 0
    s = 1 + int(np.unravel_index(np.abs(dev[1:]).argmax(), dev[1:].shape)[0]) if later else 0
    g = int(np.abs(dev[s]).argmax())
    off = int(dev[s, g])
    rule = (f"floor({frac[s]:g} x {totals[g]})" if s else "the rest after the other splits")
    how = "no patient-safe split gives" if proved else "found no patient-safe split with"
    raise QuotaError(
        f"--split-quota floor: {how} {names[s]} exactly {_photos(q[s, g])} of grade {g} "
        f"({rule}); the closest found has {q[s, g] + off}, {abs(off)} "
        f"{'over' if off > 0 else 'under'} (all of a patient's photos are in one split)")
