"""Reducer election and failover (``fednode.protocol.leader``): leases, ranks, terms, quorum, and a
seeded split-brain search, all on a hand-stepped clock. Times are seconds; the defaults are a
15 s lease, a 2 s margin, a 5 s stagger per rank, a 1 s settle and a 10 s start-up grace."""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest
from rounds_kit import config, ended, plan, result

from fednode.crypto import NodeKey, digest, seal_bytes
from fednode.errors import BadSignatureError, ConfigError
from fednode.protocol import leader as leader_mod
from fednode.protocol.leader import LeaderMachine
from fednode.protocol.leader_actions import (
    Announce,
    LeaderAction,
    PeerSeen,
    Rejected,
    Rejection,
    Renew,
    Resume,
    State,
    StepDown,
    Suspend,
    TakeOver,
    choose_members,
    open_session_checkpoint,
    peers_seen,
)
from fednode.protocol.membership import MembershipView, PeerState
from fednode.wire import (
    BlobRef,
    FederationId,
    Heartbeat,
    PeerId,
    Role,
    SessionCheckpoint,
    SessionId,
)
from fednode.wire.rounds import MAX_HOLDERS, MAX_MEMBERS

ROUNDS_MD = Path(__file__).resolve().parents[2] / "protocols" / "rounds.md"
FED, SESSION = FederationId("demo"), SessionId("s1")
WALL = 1_700_000_000_000  #: the wall clock (ms) at now = 0 on every node
R = NodeKey(b"\x01" * 32)  #: the reducer started with --role reducer
STANDBYS = sorted((NodeKey(bytes([0x40 + i]) * 32) for i in range(3)), key=lambda k: k.peer_id)
S0, S1, S2 = STANDBYS  #: auto nodes, in rank order at equal scores
CLIENTS = sorted((NodeKey(bytes([0x60 + i]) * 32) for i in range(2)), key=lambda k: k.peer_id)
C0, C1 = CLIENTS
ROLES: dict[PeerId, Role] = {
    R.peer_id: "reducer",
    **{k.peer_id: "auto" for k in STANDBYS},
    **{k.peer_id: "client" for k in CLIENTS},
}
EVERYONE = [R, *STANDBYS, *CLIENTS]
MEMBERS = tuple(sorted(k.peer_id for k in EVERYONE))
CFG = config(rounds=10_000)


def machine(key: NodeKey, role: Role | None = None, **kwargs: float) -> LeaderMachine:
    return LeaderMachine(
        peer=key.peer_id,
        public_key=key.public_key,
        federation=FED,
        session=SESSION,
        role=role or ROLES.get(key.peer_id, "client"),
        wall_offset_ms=WALL,
        **kwargs,
    )


def checkpoint(
    key: NodeKey,
    term: int,
    *,
    at: float,
    round: int = 0,
    members: tuple[PeerId, ...] = MEMBERS,
    lease_ms: int = 15_000,
) -> SessionCheckpoint:
    """``key``'s checkpoint of ``term`` made at ``now == at``."""
    return SessionCheckpoint(
        federation=FED,
        session=SESSION,
        term=term,
        round=round,
        model=digest(f"model/{round}".encode()),
        size=100,
        holders=(key.peer_id,),
        config=CFG,
        optimizer=None,
        members=members,
        lease_ms=lease_ms,
        reducer=key.public_key,
        created_ms=WALL + round_ms(at),
    )


def round_ms(seconds: float) -> int:
    return round(seconds * 1000)


def view(
    *,
    dead: Iterable[NodeKey] = (),
    suspect: Iterable[NodeKey] = (),
    heard: dict[NodeKey, float] | None = None,
    **scores: float,
) -> list[PeerSeen]:
    """Everyone alive but ``dead`` and ``suspect``; ``scores`` by peer ID; ``heard``: when the
    latest evidence of a peer arrived (unknown for the others)."""
    states = {k.peer_id: PeerState.DEAD for k in dead}
    states |= {k.peer_id: PeerState.SUSPECT for k in suspect}
    return [
        PeerSeen(
            peer=k.peer_id,
            state=states.get(k.peer_id, PeerState.ALIVE),
            role=ROLES[k.peer_id],
            score=scores.get(k.peer_id, 0.0),
            heard=(heard or {}).get(k),
        )
        for k in EVERYONE
    ]


def following(
    key: NodeKey, cp: SessionCheckpoint, peers: list[PeerSeen], now: float = 0.0
) -> LeaderMachine:
    m = machine(key)
    m.on_view(peers, now)
    assert m.on_checkpoint(cp, now) == []
    assert m.state is State.FOLLOWING
    return m


def leading(
    key: NodeKey, peers: list[PeerSeen], members: tuple[PeerId, ...] = MEMBERS
) -> LeaderMachine:
    """``key`` started as the explicit reducer at 0 (term 1), its first checkpoint fed back."""
    m = machine(key, "reducer")
    m.on_view(peers, 0.0)
    assert m.start(0.0) == [TakeOver(term=1, checkpoint=None)]
    assert m.on_checkpoint(checkpoint(key, 1, at=0.0, members=members), 0.0) == []
    return m


# ------------------------------------------------------------------------ the protocol doc


def test_rounds_md_draws_the_leader_table_and_diagram_from_the_code() -> None:
    text = ROUNDS_MD.read_text()
    table = leader_mod.describe_transitions()
    assert table in text, "protocols/rounds.md lacks the current leader table"
    assert f"```mermaid\n{leader_mod.describe_states()}\n```" in text
    assert table.count("\n") == len(leader_mod.TRANSITIONS) + 1
    for reason in Rejection:
        assert f"`{reason.value}`" in text, f"rounds.md does not explain `{reason.value}`"


# ------------------------------------------------------------------------------- takeover


def test_the_successor_takes_over_after_lease_and_margin_and_only_then() -> None:
    # Prepare: R's checkpoint at 0 (lease until 15); R dies at 1, called dead at 6
    cp = checkpoint(R, 1, at=0.0)
    s0 = following(S0, cp, view())
    # Execute / Assert
    assert s0.on_view(view(dead=[R]), 6.0) == []
    assert s0.next_deadline() == 17.0  # lease end + margin
    assert s0.on_timer(16.99) == []
    assert s0.on_timer(17.0) == [Announce(checkpoint=cp)]
    assert s0.state is State.CANDIDATE and s0.next_deadline() == 18.0  # + settle
    assert s0.on_timer(17.99) == []
    assert s0.on_timer(18.0) == [TakeOver(term=2, checkpoint=cp)]
    assert s0.state is State.LEADING
    # It closes rounds once its view has had time to drop a majority it may have just lost
    assert not s0.closing_allowed(20.99) and s0.closing_allowed(21.0)


def _taken_over_at_18() -> LeaderMachine:
    """S0 took over from R (dead at 6) at 18, as in the test above."""
    s0 = following(S0, checkpoint(R, 1, at=0.0), view())
    s0.on_view(view(dead=[R]), 6.0)
    s0.on_timer(17.0)
    assert s0.on_timer(18.0) == [TakeOver(term=2, checkpoint=checkpoint(R, 1, at=0.0))]
    return s0


def test_a_new_reducer_closes_as_soon_as_a_majority_is_heard_from_after_its_takeover() -> None:
    # Prepare: of the 6 members, R is dead; S1, S2 and C0 send a heartbeat at 18.4
    s0 = _taken_over_at_18()
    assert not s0.closing_allowed(18.2)  # nobody heard from since the takeover
    fresh = {S1: 18.4, S2: 18.4, CLIENTS[0]: 18.4, CLIENTS[1]: 17.5}
    # Execute
    s0.on_view(view(dead=[R], heard=fresh), 18.4)
    # Assert: S0 and three fresh peers are 4 of 6, long before the 3 s probation ends
    assert s0.closing_allowed(18.5)


def test_peers_heard_only_before_the_takeover_leave_the_probation_in_place() -> None:
    # Prepare: a partition just before the takeover: S1, S2 and C0 were last heard at 17.9, and
    # the view still calls them alive. Only C1 is heard after the takeover.
    s0 = _taken_over_at_18()
    stale = {S1: 17.9, S2: 17.9, CLIENTS[0]: 17.9, CLIENTS[1]: 18.4}
    # Execute
    s0.on_view(view(dead=[R], heard=stale), 18.4)
    # Assert: 2 fresh of 6 is no majority: the probation runs its course
    assert not s0.closing_allowed(18.5) and not s0.closing_allowed(20.99)
    assert s0.closing_allowed(21.0)


def test_fresh_evidence_from_suspect_peers_does_not_end_the_probation() -> None:
    s0 = _taken_over_at_18()
    fresh = {S1: 18.4, S2: 18.4, CLIENTS[0]: 18.4}
    s0.on_view(view(dead=[R], suspect=[S2], heard=fresh), 18.4)
    assert not s0.closing_allowed(18.5)


def test_a_death_called_after_the_lease_ended_starts_the_race_then() -> None:
    cp = checkpoint(R, 1, at=0.0)
    s0 = following(S0, cp, view())
    assert s0.on_timer(25.0) == []  # lease over, but the failure detector says R is alive
    assert s0.on_view(view(dead=[R]), 30.0) == []
    assert s0.on_timer(31.99) == []
    assert s0.on_timer(32.0) == [Announce(checkpoint=cp)]
    assert s0.on_timer(33.0) == [TakeOver(term=2, checkpoint=cp)]


def test_a_live_reducer_that_stops_renewing_is_replaced_a_lease_later() -> None:
    cp = checkpoint(R, 1, at=0.0)
    s0 = following(S0, cp, view())
    assert s0.next_deadline() == 32.0  # lease end 15, silent for another 15, + margin
    assert s0.on_timer(31.9) == []
    assert s0.on_timer(32.0) == [Announce(checkpoint=cp)]
    assert s0.on_timer(33.0) == [TakeOver(term=2, checkpoint=cp)]


def test_renewals_hold_the_lease_even_when_heartbeats_are_lost() -> None:
    # Prepare: R is dead to the failure detector, but its renewals keep arriving
    s0 = following(S0, checkpoint(R, 1, at=0.0), view(dead=[R]))
    # Execute
    actions: list[LeaderAction] = []
    for t in range(5, 65, 5):
        actions += s0.on_timer(float(t))
        actions += s0.on_checkpoint(checkpoint(R, 1, at=float(t)), float(t))
    # Assert: nothing until the last renewal's lease (60 + 15) and the margin have passed
    assert actions == []
    assert s0.on_timer(76.9) == []
    assert [type(a) for a in s0.on_timer(77.0)] == [Announce]


def test_a_checkpoint_from_a_fast_clock_holds_the_lease_from_its_own_time() -> None:
    # R's clock runs 10 s ahead: its lease, by its own clock, ends at 25 on ours
    s0 = following(S0, checkpoint(R, 1, at=10.0), view(dead=[R]))
    assert s0.next_deadline() == 27.0


def test_a_checkpoint_from_a_slow_clock_holds_the_lease_from_its_arrival() -> None:
    # R's clock runs 10 s behind: its checkpoint looks 10 s old, but the lease counts from
    # when it arrived, so no wall-clock offset can end R's lease early on our clock
    s0 = following(S0, checkpoint(R, 1, at=-10.0), view(dead=[R]))
    assert s0.next_deadline() == 17.0


def test_a_checkpoint_from_too_far_in_the_future_is_rejected() -> None:
    s0 = machine(S0)
    assert s0.on_checkpoint(checkpoint(R, 1, at=30.001), 0.0) == [
        Rejected(term=1, reason=Rejection.FROM_FUTURE)
    ]
    assert s0.state is State.WAITING


# ------------------------------------------------------------------------ one successor


class Cluster:
    """Nodes running a LeaderMachine each, with the driver's part done by hand: TakeOver and
    Renew publish a checkpoint, closing a round (every 4 s while allowed) publishes one, and
    Announce re-publishes one. A message reaches every live node of the sender's partition group
    at once, the sender included. Views are the same for every node of a group: a peer reachable
    now is alive; one lost stays alive 3 s, suspect 2 s more, then dead."""

    SUSPECT_AFTER, DEAD_AFTER = 3.0, 5.0

    def __init__(self, keys: Iterable[NodeKey], scores: dict[PeerId, float] | None = None):
        self.keys = {k.peer_id: k for k in keys}
        self.scores = scores or {}
        self.members = tuple(sorted(self.keys))
        self.machines = {p: self._machine(p) for p in self.keys}
        self.alive = set(self.keys)
        self.group = dict.fromkeys(self.keys, 0)
        self.round = dict.fromkeys(self.keys, 0)
        self.next_close = dict.fromkeys(self.keys, 0.0)
        self.last_reach: dict[tuple[PeerId, PeerId], float] = {}
        self.takeovers: list[tuple[float, PeerId, int]] = []
        self.leaders: dict[int, PeerId] = {}
        self.closings = 0
        self.now = 0.0
        self.queue: deque[tuple[PeerId, SessionCheckpoint]] = deque()

    def _machine(self, peer: PeerId) -> LeaderMachine:
        return machine(self.keys[peer], score=self.scores.get(peer, 0.0))

    def reachable(self, a: PeerId, b: PeerId) -> bool:
        return a in self.alive and b in self.alive and self.group[a] == self.group[b]

    def view_of(self, peer: PeerId) -> list[PeerSeen]:
        seen = []
        for other in self.keys:
            last = self.last_reach.get((peer, other))
            if other == peer or last is None:
                continue
            silent = self.now - last
            state = (
                PeerState.ALIVE
                if silent < self.SUSPECT_AFTER
                else PeerState.SUSPECT
                if silent < self.DEAD_AFTER
                else PeerState.DEAD
            )
            role = ROLES.get(other, "client")
            seen.append(
                PeerSeen(
                    peer=other,
                    state=state,
                    role=role,
                    score=self.scores.get(other, 0.0),
                    heard=last,
                )
            )
        return seen

    def publish(self, sender: PeerId, cp: SessionCheckpoint) -> None:
        for peer in self.keys:
            if peer == sender or self.reachable(sender, peer):
                self.queue.append((peer, cp))

    def make(self, peer: PeerId, term: int) -> SessionCheckpoint:
        return checkpoint(
            self.keys[peer], term, at=self.now, round=self.round[peer], members=self.members
        )

    def act(self, peer: PeerId, actions: list[LeaderAction]) -> None:
        for action in actions:
            if isinstance(action, TakeOver):
                assert self.leaders.setdefault(action.term, peer) == peer, (
                    f"term {action.term} led by {self.leaders[action.term]} and {peer}"
                )
                self.takeovers.append((self.now, peer, action.term))
                self.round[peer] = 0 if action.checkpoint is None else action.checkpoint.round
                self.publish(peer, self.make(peer, action.term))
            elif isinstance(action, Renew):
                self.publish(peer, self.make(peer, action.term))
            elif isinstance(action, Announce):
                self.publish(peer, action.checkpoint)

    def drain(self) -> None:
        while self.queue:
            peer, cp = self.queue.popleft()
            if peer in self.alive:
                self.act(peer, self.machines[peer].on_checkpoint(cp, self.now))

    def tick(self, now: float) -> None:
        self.now = now
        for a in self.alive:
            for b in self.alive:
                if self.group[a] == self.group[b]:
                    self.last_reach[a, b] = now
        for peer in sorted(self.alive):
            m = self.machines[peer]
            self.act(peer, m.on_view(self.view_of(peer), now))
            self.act(peer, m.on_timer(now))
            self.drain()
            if m.closing_allowed(now) and now >= self.next_close[peer]:
                self.round[peer] += 1
                self.next_close[peer] = now + 4.0
                self.closings += 1
                self.publish(peer, self.make(peer, m.term))
                self.drain()
        closing = [p for p in self.alive if self.machines[p].closing_allowed(now)]
        assert len(closing) <= 1, f"at {now}: {closing} may all close rounds"

    def run(self, until: float, dt: float = 0.5) -> None:
        t = self.now
        while t < until:
            t = round(t + dt, 6)
            self.tick(t)

    def start(self) -> None:
        for peer in sorted(self.alive):
            self.act(peer, self.machines[peer].start(self.now))
            self.drain()

    def kill(self, key: NodeKey) -> None:
        self.alive.discard(key.peer_id)


def started(keys: list[NodeKey], scores: dict[PeerId, float] | None = None) -> Cluster:
    cluster = Cluster(keys, scores)
    cluster.tick(0.0)
    cluster.start()
    return cluster


def test_exactly_one_of_several_standbys_takes_over() -> None:
    # Prepare: R leads term 1 from 0 and dies at 3 (its last renewal was at 0)
    cluster = started(EVERYONE)
    assert cluster.takeovers == [(0.0, R.peer_id, 1)]
    cluster.run(3.0)
    cluster.kill(R)
    # Execute
    cluster.run(80.0)
    # Assert: R's last checkpoint came at 0.5, when it closed round 1 (its probation ended as
    # soon as the others' first heartbeats came, at the first tick); so the lowest peer ID among
    # the equal standbys takes over at 0.5 + lease + margin + settle
    assert cluster.takeovers[1:] == [(18.5, S0.peer_id, 2)]
    for key in (S1, S2, C0, C1):
        m = cluster.machines[key.peer_id]
        assert (m.state, m.term) == (State.FOLLOWING, 2)
    assert cluster.closings > 10


def test_the_best_score_takes_over_first() -> None:
    cluster = started(EVERYONE, scores={S2.peer_id: 0.9, S0.peer_id: 0.5})
    cluster.run(3.0)
    cluster.kill(R)
    cluster.run(40.0)
    assert cluster.takeovers[1:] == [(18.5, S2.peer_id, 2)]


def test_the_next_standby_takes_over_after_its_stagger_when_the_first_is_dead_too() -> None:
    # Prepare: S0, ranked first, is dead but not yet called dead (still alive in the view)
    cp = checkpoint(R, 1, at=0.0)
    s1 = following(S1, cp, view(dead=[R]))
    # Execute / Assert: the race starts at 15; S1 waits margin + one stagger
    assert s1.on_timer(21.99) == []
    assert s1.on_timer(22.0) == [Announce(checkpoint=cp)]
    # S0 might have taken term 2 unheard: S1 claims the next one
    assert s1.on_timer(23.0) == [TakeOver(term=3, checkpoint=cp)]


def test_the_next_standby_goes_first_once_the_first_is_called_dead() -> None:
    cp = checkpoint(R, 1, at=0.0)
    s1 = following(S1, cp, view(dead=[R]))
    assert s1.on_view(view(dead=[R, S0]), 10.0) == []
    assert s1.on_timer(17.0) == [Announce(checkpoint=cp)]
    assert s1.on_timer(18.0) == [TakeOver(term=2, checkpoint=cp)]  # S0 died before the race


def test_a_candidate_that_hears_the_successor_stands_back() -> None:
    cp = checkpoint(R, 1, at=0.0)
    s1 = following(S1, cp, view(dead=[R, S0]))
    assert s1.on_timer(17.0) == [Announce(checkpoint=cp)]
    assert s1.on_checkpoint(checkpoint(S2, 2, at=17.5), 17.5) == []
    assert s1.state is State.FOLLOWING
    assert s1.on_timer(18.0) == []


# ------------------------------------------------------------------------------- terms


def test_messages_of_a_lower_term_are_rejected() -> None:
    # Prepare: S0 follows S1's term 3
    cp3 = checkpoint(S1, 3, at=0.0)
    s0 = following(S0, cp3, view())
    stale = Rejected(term=2, reason=Rejection.STALE_TERM)
    # Execute / Assert: the first rejection also tells the sender what it missed
    assert s0.on_checkpoint(checkpoint(R, 2, at=1.0), 1.0) == [stale, Announce(checkpoint=cp3)]
    assert s0.on_round_message(plan(term=2, key=R), 1.5) == [stale]  # once per settle period
    assert s0.on_round_message(result(1, term=2, key=R), 2.0) == [stale, Announce(checkpoint=cp3)]
    assert s0.on_session_ended(ended(term=2, key=R), 2.5) == [stale]
    assert s0.state is State.FOLLOWING and s0.term == 3
    assert s0.on_round_message(plan(term=3, key=S1), 3.0) == []
    assert s0.statistics().rejected[Rejection.STALE_TERM] == 4


def test_older_repeated_and_foreign_checkpoints_are_rejected() -> None:
    newer = checkpoint(S1, 3, at=5.0, round=2)
    s0 = following(S0, newer, view(), now=5.0)
    assert s0.on_checkpoint(newer, 6.0) == [Rejected(term=3, reason=Rejection.DUPLICATE)]
    assert s0.on_checkpoint(checkpoint(S1, 3, at=4.0, round=2), 6.0) == [
        Rejected(term=3, reason=Rejection.STALE),
        Announce(checkpoint=newer),
    ]
    other = dataclasses.replace(newer, session=SessionId("s2"), created_ms=newer.created_ms + 1)
    assert s0.on_checkpoint(other, 6.0) == [Rejected(term=3, reason=Rejection.OTHER_SESSION)]
    assert s0.checkpoint == newer


def test_a_plan_of_a_higher_term_holds_off_takeovers_for_a_lease() -> None:
    # Prepare: R's lease ends at 15; S1, called dead, took over unseen
    s0 = following(S0, checkpoint(R, 1, at=0.0), view(dead=[R, S1]))
    # Execute: one of S1's plans arrives at 10
    assert s0.on_round_message(plan(term=2, key=S1), 10.0) == []
    # Assert: S1 holds a lease from then: 10 + 15, + margin
    assert s0.term == 2
    assert s0.next_deadline() == 27.0


def test_a_resurrected_old_reducer_steps_down_on_a_higher_term() -> None:
    # Prepare: R led term 1; frozen from 1 to 40 while S0 took over term 2
    r = leading(R, view())
    assert r.closing_allowed(3.0)
    # Execute / Assert
    assert r.on_checkpoint(checkpoint(S0, 2, at=39.0), 40.0) == [StepDown(term=1)]
    assert r.state is State.FOLLOWING and not r.closing_allowed(40.0)
    assert r.on_checkpoint(checkpoint(R, 1, at=40.0), 40.0) == [
        Rejected(term=1, reason=Rejection.STALE_TERM),
        Announce(checkpoint=checkpoint(S0, 2, at=39.0)),
    ]


def test_a_resurrected_old_reducer_steps_down_when_it_finds_its_lease_lapsed() -> None:
    r = leading(R, view())
    assert r.on_timer(40.0) == [StepDown(term=1)]
    assert not r.closing_allowed(40.0)


def test_a_reducer_steps_down_on_a_plan_of_a_higher_term() -> None:
    r = leading(R, view())
    assert r.on_round_message(plan(term=2, key=S1), 3.0) == [StepDown(term=1)]


def test_two_reducers_of_one_term_settle_on_the_smaller_key() -> None:
    small, large = sorted((S0, S1), key=lambda k: k.public_key)
    lead_small, lead_large = leading(small, view()), leading(large, view())
    assert lead_large.on_checkpoint(checkpoint(small, 1, at=1.0), 1.0) == [StepDown(term=1)]
    assert lead_small.on_checkpoint(checkpoint(large, 1, at=1.0), 1.0) == [
        Rejected(term=1, reason=Rejection.RIVAL),
        Announce(checkpoint=checkpoint(small, 1, at=0.0)),
    ]
    assert lead_small.state is State.LEADING


def test_a_session_end_stops_the_election() -> None:
    s0 = following(S0, checkpoint(R, 1, at=0.0), view(dead=[R]))
    assert s0.on_session_ended(ended(term=1, key=R), 1.0) == []
    assert s0.state is State.ENDED
    assert s0.on_timer(100.0) == [] and s0.next_deadline() is None
    assert s0.on_checkpoint(checkpoint(S1, 2, at=2.0), 2.0) == [
        Rejected(term=2, reason=Rejection.ENDED)
    ]


# ---------------------------------------------------------------------------------- quorum


def test_a_minority_never_takes_over_and_a_majority_does() -> None:
    # Prepare: five members; R dies at 3 and the rest split 2 / 2
    keys = [R, S0, S1, C0, C1]
    cluster = started(keys)
    cluster.run(3.0)
    cluster.kill(R)
    cluster.group.update({S1.peer_id: 1, C1.peer_id: 1})
    # Execute
    cluster.run(300.0)
    # Assert: neither side sees three of the five
    assert cluster.takeovers == [(0.0, R.peer_id, 1)]
    assert not cluster.machines[S0.peer_id].quorum()
    # Once C1 rejoins S0's side, it has three: S0 takes over
    cluster.group[C1.peer_id] = 0
    cluster.run(330.0)
    assert [(p, t) for _, p, t in cluster.takeovers[1:]] == [(S0.peer_id, 2)]


def test_a_reducer_that_loses_its_majority_stops_closing_rounds() -> None:
    # Prepare
    r = leading(R, view())
    # Execute / Assert: at 3 it sees itself and one client of six
    assert r.on_view(view(dead=[S0, S1, S2, C1]), 3.0) == [Suspend(term=1)]
    assert r.state is State.STALLED and not r.closing_allowed(3.0)
    assert r.on_timer(5.0) == [] and r.on_timer(10.0) == []  # no renewal without a majority
    assert r.on_timer(15.0) == [StepDown(term=1)]  # its lease ran out


def test_a_reducer_that_sees_its_majority_again_resumes_after_settling() -> None:
    r = leading(R, view())
    assert r.on_view(view(suspect=[S0, S1, S2, C1]), 3.0) == [Suspend(term=1)]  # suspect: unseen
    assert r.on_view(view(), 8.0) == [Renew(term=1)]
    assert r.state is State.RESUMING and not r.closing_allowed(8.5)
    assert r.on_timer(8.5) == []
    assert r.on_timer(9.0) == [Resume(term=1)]
    assert r.closing_allowed(9.0)


def test_a_resuming_reducer_corrected_by_a_newer_term_steps_down() -> None:
    r = leading(R, view())
    r.on_view(view(dead=[S0, S1, S2, C1]), 3.0)
    assert r.on_view(view(), 14.0) == [Renew(term=1)]
    assert r.on_checkpoint(checkpoint(S0, 2, at=14.2), 14.2) == [StepDown(term=1)]


def test_a_leader_renews_every_third_of_its_lease() -> None:
    r = leading(R, view())
    assert r.next_deadline() == 5.0
    assert r.on_timer(5.0) == [Renew(term=1)]
    assert r.on_checkpoint(checkpoint(R, 1, at=5.0), 5.1) == []
    assert r.next_deadline() == 10.0
    assert r.closing_allowed(19.9) and not r.closing_allowed(20.0)


# ------------------------------------------------------------------------ the initial election


def test_the_explicit_reducer_leads_term_1_at_start() -> None:
    r = machine(R)
    assert r.start(0.0) == [TakeOver(term=1, checkpoint=None)]
    assert r.closing_allowed(3.0)


def test_a_node_that_knows_a_reducer_does_not_start_a_session() -> None:
    r = machine(R)
    assert r.on_checkpoint(checkpoint(S0, 4, at=0.0), 0.0) == []
    assert r.start(0.0) == []
    assert r.state is State.FOLLOWING


def test_auto_nodes_elect_the_best_ranked_after_the_grace_period() -> None:
    cluster = started([*STANDBYS, *CLIENTS])
    cluster.run(60.0)
    assert cluster.takeovers == [(10.0, S0.peer_id, 1)]


def test_auto_nodes_wait_for_an_explicit_reducer() -> None:
    # Prepare: R is alive in every view but has not started the session
    autos = [machine(k) for k in STANDBYS]
    actions: list[LeaderAction] = []
    # Execute
    for m in autos:
        actions += m.on_view(view(), 0.0) + m.start(0.0)
    for t in range(1, 100):
        for m in autos:
            actions += m.on_timer(float(t))
    # Assert
    assert actions == []


def test_keepers_follow_and_correct_but_never_lead() -> None:
    c0 = following(C0, checkpoint(R, 2, at=0.0), view(dead=[R]))
    assert c0.on_timer(1000.0) == [] and c0.next_deadline() is None
    assert [type(a) for a in c0.on_checkpoint(checkpoint(S0, 1, at=1.0), 1000.0)] == [
        Rejected,
        Announce,
    ]


# --------------------------------------------------------------------------- split brain


def _chaos(seed: int) -> Cluster:
    """Deaths, revivals (resumed as they were, or restarted from the persisted checkpoint),
    splits and heals, one at most every 6 s (longer than the failure detector takes to call a
    peer dead, which keeps every group's view the same)."""
    rng = random.Random(seed)
    keys = [R, *STANDBYS, *CLIENTS, NodeKey(b"\x70" * 32)]
    cluster = started(keys)
    last = 0.0
    for step in range(1, 1601):
        now = step * 0.5
        cluster.tick(now)
        if now < 20 or now - last < 6 or rng.random() > 0.15:
            continue
        last = now
        alive, dead = sorted(cluster.alive), sorted(set(cluster.keys) - cluster.alive)
        kind = rng.choice(["kill", "revive", "split", "heal"])
        if kind == "kill" and len(alive) > 1:
            cluster.alive.discard(rng.choice(alive))
        elif kind == "revive" and dead:
            peer = rng.choice(dead)
            if rng.random() < 0.5:  # a restart: a fresh machine fed what it persisted
                persisted = cluster.machines[peer].checkpoint
                fresh = cluster.machines[peer] = cluster._machine(peer)
                if persisted is not None:
                    fresh.on_checkpoint(persisted, now)
                fresh.start(now)
            cluster.alive.add(peer)
            cluster.group[peer] = rng.choice([cluster.group[p] for p in alive] or [0])
        elif kind == "split":
            groups = sorted({cluster.group[p] for p in alive})
            split = rng.choice(groups)
            inside = [p for p in alive if cluster.group[p] == split]
            if len(inside) > 1:
                new = max(cluster.group.values()) + 1
                for p in rng.sample(inside, rng.randint(1, len(inside) - 1)):
                    cluster.group[p] = new
        elif kind == "heal":
            for p in cluster.group:
                cluster.group[p] = 0
    return cluster


#: Six seeds, and three from a 200-seed search that reach rare interleavings: a split as a
#: standby claims a term (56, 98) and a split as two standbys claim at once (192). Each of the
#: three fails if, in turn, a resuming reducer does not wait ``settle``, a candidate does not
#: skip the terms its predecessors may have claimed, or a new reducer closes rounds at once.
#: 450 (from a 1,000-seed search): a holder that comes back moves the race later, after a
#: standby cut off by a split claimed; it fails if the count of rivals ahead starts at the race.
CHAOS_SEEDS = [*range(6), 56, 98, 192, 450]


@pytest.mark.parametrize("seed", CHAOS_SEEDS)
def test_no_two_reducers_lead_one_term_or_close_rounds_at_once(seed: int) -> None:
    # Execute: Cluster.act and Cluster.tick assert the two properties at every step
    cluster = _chaos(seed)
    # Assert: the run was not idle: reducers came and went, and rounds closed
    assert len(cluster.takeovers) >= 2
    assert cluster.closings >= 20


def test_after_the_chaos_heals_one_reducer_closes_rounds_again() -> None:
    cluster = _chaos(3)
    for peer in cluster.keys:
        cluster.group[peer] = 0
    cluster.alive |= set(cluster.keys)  # paused ones resume as they were
    cluster.run(cluster.now + 120.0)
    closing = [p for p in cluster.keys if cluster.machines[p].closing_allowed(cluster.now)]
    assert len(closing) == 1


# ---------------------------------------------------------------------------- the message


def test_a_checkpoint_for_a_thousand_participants_seals_far_below_64_kib() -> None:
    # Prepare: 1,000 clients, 10 combiners, 4 eligible nodes; 64 holders
    keys = [NodeKey(i.to_bytes(4, "big") * 8) for i in range(1014)]
    ids = [k.peer_id for k in keys]
    members = choose_members(ids[:4], ids[4:14], ids[14:])
    made = dataclasses.replace(
        checkpoint(R, 7, at=0.0, round=5, members=members),
        holders=tuple(ids[:MAX_HOLDERS]),
        config=config(rounds=10_000, server_optimizer="fedadam"),
        optimizer=BlobRef(digest=digest(b"optimizer state"), size=123_456),
    )
    # Execute
    sealed = seal_bytes(R, made)
    # Assert
    assert len(members) == MAX_MEMBERS and set(ids[:14]) <= set(members)
    assert len(sealed) < 20_000, len(sealed)
    assert open_session_checkpoint(sealed) == made


def test_a_checkpoint_must_be_sealed_by_the_reducer_it_names() -> None:
    made = checkpoint(R, 1, at=0.0)
    assert open_session_checkpoint(seal_bytes(R, made)) == made
    with pytest.raises(BadSignatureError, match="reducer"):
        open_session_checkpoint(seal_bytes(S0, made))


def test_choose_members_takes_the_groups_in_priority_order() -> None:
    assert choose_members(["e"], ["c2", "c1"], ["k3", "k1", "k2"], limit=4) == (
        "c1",
        "c2",
        "e",
        "k1",
    )


def test_peers_seen_reads_role_state_and_score_from_the_membership_view() -> None:
    # Prepare
    membership = MembershipView(S0.peer_id, FED)
    heartbeat = Heartbeat(
        federation=FED, peer=S1.peer_id, incarnation=1, seq=0, sent_ms=0, interval_ms=1000,
        role="auto", capacity=4, attached=0, cpu=0.25, memory=0.2, bandwidth=1e6, region="",
        addrs=(), session=SESSION, round=-1,
    )  # fmt: skip
    membership.on_heartbeat(heartbeat, 0.0)
    # Execute
    (seen,) = peers_seen(membership)
    # Assert
    assert seen == PeerSeen(
        peer=S1.peer_id, state=PeerState.ALIVE, role="auto", score=0.6, heard=0.0
    )
    assert seen.eligible and seen.standing


@pytest.mark.parametrize(
    "bad",
    [
        {"lease": 0.0},
        {"lease": 601.0},
        {"settle": 0.0},
        {"stagger": 1.0},
        {"margin": -1.0},
        {"detection": -1.0},
    ],
    ids=repr,
)
def test_bad_timings_are_a_config_error(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        machine(S0, **bad)
