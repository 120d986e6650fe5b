"""Maglev's fill kept with the record of how it was made, so that a change of a few backends
takes again only the turns it touches, and ends with the table a fill from scratch makes.

A fill is ``size`` turns (the rules are in :mod:`lbclient.selection.maglev`). Its first
``size - free`` turns, the *window*, are recorded:

* for each backend, its *lane*: the first slot and the step of its permutation, and the position
  along it of the slot each of its window turns claimed;
* for each slot, the turn that claimed it (the backend, in the table, and the number of that
  backend's turn), and the backends whose window walks *reached* it: those that stepped over it,
  taken, on their way, or claimed it. A backend's window walks cover its permutation from its
  first slot to its last window claim, so this changes only where that last claim moves.

The last ``free`` turns, the *tail*, are not: near the end of the fill a turn steps over a large
share of the table. They are taken again after every change, from where the window ends (about
3 ms for the default table of 65,537 slots and ``free`` = 1,024).

A turn is known by its place in the fill, ``(round, backend's sort order, place in the round's
run of that backend's turns)``; a change keeps the order of the turns that stay. It replays the
window in that order, visiting only the turns whose outcome may differ:

* a turn of a backend that left frees its slot; so does a turn that now claims another slot.
  The turns after it that stepped over that slot are visited (the backends that reached it are
  in the record; which of their turns that was, their lanes say): the first of them that reaches
  it claims it now;
* the turns of a backend that joined are visited, and those that move into the window because
  turns before them left;
* a visited turn walks its permutation from where the backend's previous turn stopped, against
  the claims *of the new fill* so far. If it claims another slot than before, the turn that
  claimed that slot later in the old fill is visited, and so is the backend's next turn;
* every other turn claims what it claimed before, as nothing it walked over has changed.

The turns that fall out of the window, because turns joined before them, free their slots for the
tail. The cost is that of the turns visited and of copying the record's arrays, not of the set.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from heapq import heappop, heappush
from itertools import count, cycle, islice, repeat
from operator import mod
from typing import Final, TypeAlias

from lbclient.backend import Backend
from lbclient.selection._maglev_fill import (
    TAIL,
    Rounds,
    Turn,
    permutation_start,
    pick_turns,
    read_turns,
    turn_of,
    turns,
    turns_before,
)
from lbclient.selection.base import Change, _weights_of

__all__ = [
    "MAX_CHANGES",
    "MAX_REPLAYED",
    "MAX_TURNS",
    "MIN_LOGGED",
    "WINDOW_FREE",
    "FillLog",
    "advance",
    "record",
    "recordable",
]

#: The tail: this many last turns are taken again after every change. A longer tail costs more
#: to take again; a shorter one leaves turns in the window that step over more slots, so that
#: each visit costs more (at 10,000 backends, 1,024 is the quickest for changes of one to five).
WINDOW_FREE: Final = 1024
#: Smaller tables are filled afresh on every change: that costs little, and a record would
#: cost more than it saves.
MIN_LOGGED: Final = 8_192
#: A fill is recorded only when each backend takes this many turns or fewer per unit of weight
#: (10,000 backends of one weight take 6.6 turns each in 65,537 slots): with more turns each, a
#: change moves the claims of more turns of the backends it touches, one after another, and a
#: replay would cost more than a fill.
MAX_TURNS: Final = 16
#: A change of more backends than this is not replayed but filled afresh, and so is one whose
#: replay would visit more turns than :data:`MAX_REPLAYED` (each visit costs about as much as
#: 20 turns of a fill).
MAX_CHANGES: Final = 16
MAX_REPLAYED: Final = 3_000
#: A slot's mark in :attr:`FillLog.window`: the round of the turn that claimed it, up to ``CAP``
#: (a later round is marked ``CAP``), or ``IN_TAIL`` when the tail claimed it. While a change is
#: replayed, ``CHANGED`` marks the slots whose claim differs from the old fill's.
CAP: Final = 253
CHANGED: Final = 254
IN_TAIL: Final = 255
#: The tail reads this many steps of a permutation at once (see ``read_turns``): a turn of the
#: tail steps over 64 slots or more, and 64 copies of the table (4 MB) cost less than reading
#: more often.
_TAIL_STRETCH: Final = 64
#: ``window.translate(_CLAIMED)``: 1 for each slot claimed in the window, 0 for the others.
_CLAIMED: Final = bytes(0 if mark == IN_TAIL else 1 for mark in range(256))

#: A backend's lane: the first slot and the step of its permutation, and the position along it of
#: the slot each of its window turns claimed (increasing).
Lane: TypeAlias = "tuple[int, int, tuple[int, ...]]"


class FillLog:
    """A Maglev table with the record of its fill's window.

    Immutable once made, but for its arrays of backends by slot (:attr:`reached`): the first
    change replayed from it takes them over and edits them in place (copying them would cost
    more than the edits), after which this record is spent, and a change from it again is
    filled from scratch. Taking over is one atomic step, so two threads replaying from one
    record cannot both edit them.

    The backends are kept there by ``id`` (their objects are in :attr:`members`): arrays of
    numbers are edited in C, and hold no references for the garbage collector to walk.
    """

    __slots__ = (
        "backends",
        "bound",
        "claims",
        "divisor",
        "free",
        "lanes",
        "members",
        "reached",
        "replayed",
        "rounds",
        "size",
        "table",
        "unspent",
        "window",
    )

    def __init__(
        self,
        rounds: Rounds,
        size: int,
        free: int,
        lanes: dict[int, Lane],
        claims: array[int],
        window: bytes | bytearray,
        reached: list[array[int]],
        table: tuple[Backend, ...],
        members: dict[int, Backend] | None = None,
        replayed: int = 0,
    ) -> None:
        self.backends = rounds.backends
        self.rounds = rounds
        self.divisor = rounds.divisor
        self.size = size
        self.free = free
        #: The place of the first turn of the tail.
        self.bound = rounds.place(size - free)
        #: Lanes by the ``id`` of their backend (each one of ``backends``).
        self.lanes = lanes
        #: For each slot claimed in the window, the number of its owner's turn that claimed it.
        self.claims = claims
        #: The mark of each slot: the round that claimed it (``CAP`` at most), or ``IN_TAIL``.
        self.window = window
        #: For each slot, the ``id`` of each backend whose window walks reached it (in no order).
        self.reached = reached
        #: The backends by ``id``.
        self.members = {id(b): b for b in rounds.backends} if members is None else members
        #: Holds one item until a replay takes :attr:`reached` over (``list.pop`` is atomic).
        self.unspent = [True]
        #: The owner of every slot.
        self.table = table
        #: How many turns of the window the change that made this fill visited (0 for a fill
        #: from scratch).
        self.replayed = replayed


def _tail(
    backends: tuple[Backend, ...],
    lanes: dict[int, Lane],
    taken: bytes,
    takers: list[int],
    table: list[Backend],
) -> None:
    """Take the tail's turns (``takers``, backend indexes) from the window's end, where
    ``taken`` marks the slots claimed (1), writing their claims into ``table``."""
    size = len(taken)
    place: dict[int, int] = {}
    steps: dict[int, int] = {}
    for i in set(takers):
        offset, skip, claimed = lanes[id(backends[i])]
        place[i] = (offset + (claimed[-1] + 1 if claimed else 0) * skip) % size
        steps[i] = skip
    owners: dict[int, int] = {}
    picked = len(takers) - min(TAIL, len(takers))
    left = read_turns(iter(takers[:picked]), place, steps, owners, taken, _TAIL_STRETCH)
    pick_turns(iter(takers[picked:]), place, steps, owners, left)
    for slot, i in owners.items():
        table[slot] = backends[i]


def record(
    backends: tuple[Backend, ...],
    size: int,
    starts: Sequence[tuple[int, int]] | None = None,
    free: int = WINDOW_FREE,
) -> FillLog:
    """Fill the table over ``backends`` (sorted, at least one), recording its window.

    ``starts``: each backend's ``(offset, skip)`` when known. Raises ValueError, as the fill
    does, when ``size`` is smaller than the total weight.
    """
    order = turns(backends, size)
    weights = _weights_of(backends)
    rounds = Rounds(backends, math.gcd(*weights), weights)
    if starts is None:
        starts = [permutation_start(b.address, size) for b in backends]
    free = min(max(free, 0), size)
    claimed: list[list[int]] = [[] for _ in backends]
    nexts = [0] * len(backends)
    table: list[Backend] = [backends[0]] * size
    claims = array("i", [0]) * size
    taken = bytearray(size)
    window = bytearray([IN_TAIL]) * size
    runs = [w // rounds.divisor for w in weights]
    reached = [array("Q") for _ in range(size)]
    order_cycle = cycle(order)
    for i in islice(order_cycle, size - free):
        backend = backends[i]
        ident = id(backend)
        offset, skip = starts[i]
        at = nexts[i]
        slot = (offset + at * skip) % size
        while taken[slot]:
            reached[slot].append(ident)
            at += 1
            slot += skip
            if slot >= size:
                slot -= size
        taken[slot] = 1
        reached[slot].append(ident)
        table[slot] = backend
        mine = claimed[i]
        claims[slot] = len(mine)
        window[slot] = min(len(mine) // runs[i], CAP)
        mine.append(at)
        nexts[i] = at + 1
    lanes = {
        id(b): (offset, skip, tuple(mine))
        for b, (offset, skip), mine in zip(backends, starts, claimed, strict=True)
    }
    _tail(backends, lanes, bytes(taken), list(islice(order_cycle, free)), table)
    return FillLog(rounds, size, free, lanes, claims, window, reached, tuple(table))


def recordable(backends: tuple[Backend, ...], size: int) -> bool:
    """Whether a fill of ``size`` slots over ``backends`` is worth recording (see
    :data:`MIN_LOGGED` and :data:`MAX_TURNS`)."""
    if size < MIN_LOGGED or not backends:
        return False
    weights = _weights_of(backends)
    divisor = math.gcd(*weights)
    return sum(w // divisor for w in weights) * MAX_TURNS >= size


def advance(
    log: FillLog,
    backends: tuple[Backend, ...],
    change: Change,
    *,
    max_turns: int | None = MAX_TURNS,
) -> FillLog | None:
    """The fill over ``backends``, which ``change`` made from ``log``'s set, with its record;
    None when a fill from scratch is wanted instead: the change is large, the weights' common
    divisor changed, the new set takes more than ``max_turns`` turns per unit of weight (None:
    any number), or the replay would visit too many turns."""
    if not backends or len(change) > MAX_CHANGES:
        return None
    divisor = log.divisor
    if log.rounds.starts is None and all(b.weight == divisor for b in change.added):
        rounds = Rounds(backends, divisor, ())  # the weights are all the same still
    else:
        weights = _weights_of(backends)
        if math.gcd(*weights) != divisor:
            return None
        rounds = Rounds(backends, divisor, weights)
    if rounds.width > log.size:  # a fill from scratch raises, naming the sizes
        return None
    if max_turns is not None and rounds.width * max_turns < log.size:
        return None
    try:
        log.unspent.pop()
    except IndexError:  # another replay took the record's lists over
        return None
    return _Replay(log, rounds, change).run()


class _Replay:
    """One change replayed over a recorded fill (see the module's documentation)."""

    def __init__(self, log: FillLog, rounds: Rounds, change: Change) -> None:
        self.log = log
        self.rounds = rounds
        self.change = change
        self.size = log.size
        self.divisor = log.divisor
        self.bound = rounds.place(log.size - log.free)
        self.gone = {id(b) for b in change.removed}
        self.joined: dict[int, Lane] = {
            id(b): (*permutation_start(b.address, log.size), ()) for b in change.added
        }
        #: The slots whose claim differs from the old fill's: the place of the turn that claims
        #: them now, or None while free; marked ``CHANGED`` in a copy of the old window's marks.
        self.changed: dict[int, Turn | None] = {}
        self.marks = bytearray(log.window)
        self.claimer: dict[int, tuple[Backend, int]] = {}
        #: The claim position of each turn visited, by (id of its backend, its number).
        self.played: dict[tuple[int, int], int] = {}
        self.who: dict[int, Backend] = {}
        self.touched: list[int] = []
        #: The turns whose walk changed: (backend, turn number, old walk from, old claim, new
        #: walk from, new claim).
        self.moves: list[tuple[Backend, int, int | None, int | None, int, int]] = []
        self.queue: list[tuple[Turn, int, Backend, int]] = []
        self.tick = count()

    def lane(self, backend: Backend) -> Lane:
        ident = id(backend)
        lane = self.log.lanes.get(ident)
        return self.joined[ident] if lane is None else lane

    def push(self, backend: Backend, number: int) -> None:
        place = turn_of(backend, number, self.divisor)
        if place < self.bound and (id(backend), number) not in self.played:
            heappush(self.queue, (place, next(self.tick), backend, number))

    def run(self) -> FillLog | None:
        log = self.log
        divisor = self.divisor
        for backend in self.change.removed:
            offset, skip, claimed = log.lanes[id(backend)]
            for number, at in enumerate(claimed):
                slot = (offset + at * skip) % self.size
                self.changed[slot] = None
                self.marks[slot] = CHANGED
                self.wake(slot, turn_of(backend, number, divisor))
        for backend in self.change.added:
            for number in range(turns_before(backend, self.bound, divisor)):
                self.push(backend, number)
        number = log.size - log.free - 1
        while number >= 0:  # the turns that moved into the window
            i, mine = self.rounds.taker(number)
            backend = self.rounds.backends[i]
            if turn_of(backend, mine, divisor) < log.bound:
                break
            self.push(backend, mine)
            number -= 1
        queue = self.queue
        played = self.played
        while queue:
            place, _, backend, number = heappop(queue)
            if (id(backend), number) not in played:
                if len(played) >= MAX_REPLAYED:
                    return None
                self.play(backend, number, place)
        return self.finish()

    def position(self, backend: Backend, number: int) -> int:
        """Where the new fill's turn ``number`` of ``backend`` claims, along its permutation."""
        at = self.played.get((id(backend), number))
        return self.lane(backend)[2][number] if at is None else at

    def reach(self, offset: int, skip: int, at: int, place: Turn) -> tuple[int, int]:
        """The first slot along the permutation ``(offset, skip)`` from position ``at`` that no
        turn before ``place`` claims in the new fill: its position and the slot."""
        size = self.size
        marks = self.marks
        log = self.log
        below = min(place[0], CAP)  # a slot marked lower was claimed in an earlier round
        slot = (offset + at * skip) % size
        while True:
            mark = marks[slot]
            if mark >= below:
                if mark == CHANGED:
                    claim = self.changed[slot]
                    if claim is None or not claim < place:
                        return at, slot
                elif mark == IN_TAIL or not (
                    turn_of(log.table[slot], log.claims[slot], self.divisor) < place
                ):
                    return at, slot
            at += 1
            slot += skip
            if slot >= size:
                slot -= size

    def wake(self, slot: int, place: Turn) -> None:
        """``slot``, claimed in the old fill at ``place``, is free in the new one: visit the
        turns after it that stepped over it."""
        size = self.size
        members = self.log.members
        for ident in self.log.reached[slot]:
            if ident in self.gone:
                continue
            backend = members[ident]
            offset, skip, claimed = self.log.lanes[ident]
            at = (slot - offset) * pow(skip, -1, size) % size
            number = bisect_right(claimed, at)
            if number and claimed[number - 1] == at:
                continue  # its turn claimed the slot, not stepped over it
            if turn_of(backend, number, self.divisor) > place:
                self.push(backend, number)

    def play(self, backend: Backend, number: int, place: Turn) -> None:
        """Take ``backend``'s turn ``number`` (at ``place``) in the new fill."""
        size = self.size
        offset, skip, old = self.lane(backend)
        start = self.position(backend, number - 1) + 1 if number else 0
        at, slot = self.reach(offset, skip, start, place)
        self.played[id(backend), number] = at
        self.who[id(backend)] = backend
        before = old[number] if number < len(old) else None
        old_start = (old[number - 1] + 1 if number else 0) if before is not None else None
        if before == at and old_start == start:
            return
        self.moves.append((backend, number, old_start, before, start, at))
        if before == at:
            return
        changed = self.changed
        if before is not None:
            left = (offset + before * skip) % size
            if left not in changed:
                changed[left] = None
                self.marks[left] = CHANGED
                self.wake(left, place)
        log = self.log
        if slot not in changed and log.window[slot] != IN_TAIL:
            # Free at this turn in the old fill too: a later turn claimed it, and must look again.
            self.push(log.table[slot], log.claims[slot])
        changed[slot] = place
        self.marks[slot] = CHANGED
        self.claimer[slot] = (backend, number)
        self.push(backend, number + 1)

    def leaving(self) -> list[tuple[Backend, int]]:
        """The old window's last turns that the new window no longer reaches."""
        log = self.log
        out: list[tuple[Backend, int]] = []
        number = log.size - log.free - 1
        while number >= 0:
            i, mine = log.rounds.taker(number)
            backend = log.backends[i]
            if turn_of(backend, mine, self.divisor) < self.bound:
                break
            if id(backend) not in self.gone:
                out.append((backend, mine))
            number -= 1
        return out

    def finish(self) -> FillLog:
        log = self.log
        size = self.size
        leaving = self.leaving()
        lanes = self.lanes(leaving)
        table = list(log.table)
        claims = log.claims[:]
        window = self.marks
        for slot, place in self.changed.items():
            if place is None:
                window[slot] = IN_TAIL
            else:
                backend, number = self.claimer[slot]
                window[slot] = min(place[0], CAP)
                table[slot] = backend
                claims[slot] = number
        for backend, number in leaving:
            offset, skip, claimed = log.lanes[id(backend)]
            slot = (offset + claimed[number] * skip) % size
            if slot not in self.changed:
                window[slot] = IN_TAIL
        backends = self.rounds.backends
        takers = self.rounds.takers(size - log.free, size)
        _tail(backends, lanes, bytes(window.translate(_CLAIMED)), takers, table)
        return FillLog(
            self.rounds,
            size,
            log.free,
            lanes,
            claims,
            window,
            self.reached(lanes),
            tuple(table),
            self.members(),
            len(self.played),
        )

    def members(self) -> dict[int, Backend]:
        members = self.log.members.copy()  # a clone in C, even of a dict with deletions
        for backend in self.change.removed:
            del members[id(backend)]
        for backend in self.change.added:
            members[id(backend)] = backend
        return members

    def lanes(self, leaving: list[tuple[Backend, int]]) -> dict[int, Lane]:
        """The new fill's lanes: the old ones with the claims that moved, and the turns that
        joined or left."""
        lanes = self.log.lanes.copy()  # a clone in C, even of a dict with deletions
        who = self.who
        for backend in self.change.removed:
            del lanes[id(backend)]
            who[id(backend)] = backend
        for backend in self.change.added:
            who[id(backend)] = backend
        lanes.update(self.joined)
        played: dict[int, list[tuple[int, int]]] = {}
        for backend, number, _, before, _, at in self.moves:
            if before != at:
                played.setdefault(id(backend), []).append((number, at))
        for backend, _ in leaving:
            played.setdefault(id(backend), [])
            who[id(backend)] = backend
        for ident, turns_played in played.items():
            backend = who[ident]
            offset, skip, old = lanes[ident]
            claimed = list(old)
            for number, at in sorted(turns_played):
                if number < len(claimed):
                    claimed[number] = at
                else:
                    claimed.append(at)
            del claimed[turns_before(backend, self.bound, self.divisor) :]
            lanes[ident] = (offset, skip, tuple(claimed))
        #: The backends whose lanes may differ from the old ones.
        self.touched = list({*played, *map(id, self.change.removed), *self.joined})
        return lanes

    def reached(self, lanes: dict[int, Lane]) -> list[array[int]]:
        """The new fill's arrays of backends by slot: the old ones, edited in place where a
        backend's last window claim moved (or the backend left or joined): the slots between
        the two are reached by one fill and not the other (a backend's permutation visits a
        slot once, so the order of the edits does not matter)."""
        log = self.log
        size = self.size
        reached = log.reached
        arrays = reached.__getitem__
        old_lanes = log.lanes
        for ident in self.touched:
            old = old_lanes.get(ident)
            new = lanes.get(ident)
            lane = new if old is None else old
            if lane is None:  # a backend that left, then joined as another object
                continue
            offset, skip, _ = lane
            before = old[2][-1] if old and old[2] else -1
            after = new[2][-1] if new and new[2] else -1
            if before == after:
                continue
            low, high = min(before, after) + 1, max(before, after) + 1
            first = offset + low * skip
            walked = map(
                arrays, map(mod, range(first, first + (high - low) * skip, skip), repeat(size))
            )
            edit = array.append if after > before else array.remove
            deque(map(edit, walked, repeat(ident)), maxlen=0)
        return reached
