"""``fednode demo --kill`` specifications: parsing, refusals, when each fires and on whom, with
explicit roles and in auto mode (victims chosen by the ``combiner-assigned`` events heard)."""

from __future__ import annotations

import pytest

from fednode.errors import ConfigError
from fednode.scenario.kills import Chaos, KillSpec, check_kills, data_losses, parse_kill


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("combiner@2", KillSpec(role="combiner", round=2, phase="push")),
        ("reducer@3:reduce", KillSpec(role="reducer", round=3, phase="reduce")),
        (" client@1:fetch ", KillSpec(role="client", round=1, phase="fetch")),
        ("combiner@1:partial", KillSpec(role="combiner", round=1, phase="partial")),
    ],
)
def test_kill_specs_parse(text: str, expected: KillSpec) -> None:
    assert parse_kill(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("combiner", "ROLE@ROUND"),
        ("bootstrap@1", "role must be one of"),
        ("client@x", "round must be a number"),
        ("client@0", "rounds count from 1"),
        ("client@1:nap", "phase must be one of"),
    ],
)
def test_bad_kill_specs_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_kill(text)


def test_a_kill_fires_on_its_phase_event_of_its_round_only() -> None:
    kill = parse_kill("combiner@2:partial")
    assert kill.fires_on("partial-pushed", 2)
    assert not kill.fires_on("partial-pushed", 1)
    assert not kill.fires_on("update-pushed", 2)
    assert str(kill) == "combiner@2:partial"


def test_kills_the_federation_cannot_survive_are_refused() -> None:
    with pytest.raises(ConfigError, match="only 3 rounds"):
        check_kills([parse_kill("client@4")], rounds=3, clients=4, combiners=2)
    with pytest.raises(ConfigError, match="one combiner must survive"):
        check_kills(
            [parse_kill("combiner@1"), parse_kill("combiner@2")], rounds=3, clients=4, combiners=2
        )
    with pytest.raises(ConfigError, match="one client must survive"):
        check_kills([parse_kill("client@1")], rounds=3, clients=1, combiners=2)
    check_kills(
        [parse_kill("reducer@2"), parse_kill("combiner@1")], rounds=3, clients=4, combiners=2
    )


def test_with_explicit_roles_the_victim_is_the_lowest_numbered_live_node_of_the_role() -> None:
    # Prepare
    chaos = Chaos((), 0.0, "reducer")
    alive = ["bootstrap", "reducer", "combiner-1", "combiner-0", "client-10", "client-2"]
    # Execute, Assert
    assert chaos.victim(parse_kill("combiner@1"), alive) == "combiner-0"
    assert chaos.victim(parse_kill("client@1"), alive) == "client-2"
    assert chaos.victim(parse_kill("reducer@1"), alive) == "reducer"
    assert chaos.victim(parse_kill("client@1"), ["reducer"]) is None
    assert not chaos.postpone(parse_kill("client@1"), ["reducer"])


# --- auto mode ---

AUTOS = [f"auto-{i}" for i in range(6)]


def assigned(chaos: Chaos, node: str, round_: int, amendment: int = 0) -> KillSpec | None:
    event = {"event": "combiner-assigned", "round": round_, "amendment": amendment, "clients": 3}
    return chaos.on_event(node, event, 1.0)


def test_auto_mode_every_kill_costs_an_auto_node_of_data() -> None:
    # Prepare
    kills = [parse_kill(k) for k in ("client@1", "combiner@2", "combiner@2:plan", "reducer@3")]
    # Execute, Assert
    assert data_losses(kills) == 1  # explicit roles: only the client kill
    assert data_losses(kills, auto=True) == 4
    assert data_losses(kills, auto=True, standbys=1) == 3  # a standby reducer takes over first
    assert data_losses(kills, auto=True, standbys=5) == 3


def test_auto_mode_kills_are_refused_only_when_no_auto_node_would_keep_training() -> None:
    # Prepare: more combiner kills than combiners: other auto nodes are elected
    combiners = [parse_kill("combiner@1"), parse_kill("combiner@2"), parse_kill("combiner@3")]
    # Execute, Assert
    check_kills(combiners, rounds=3, clients=4, combiners=2, auto=True)
    with pytest.raises(ConfigError, match="3 of the 3 auto nodes would stop training"):
        check_kills(combiners, rounds=3, clients=3, combiners=2, auto=True)
    with pytest.raises(ConfigError, match="one combiner must survive"):
        check_kills(combiners, rounds=3, clients=4, combiners=2)  # not in auto mode
    both = [parse_kill("reducer@1"), parse_kill("client@2")]
    with pytest.raises(ConfigError, match="2 of the 2 auto nodes"):
        check_kills(both, rounds=3, clients=2, combiners=1, auto=True)
    check_kills(both, rounds=3, clients=2, combiners=1, auto=True, standbys=1)
    with pytest.raises(ConfigError, match="only 3 rounds"):
        check_kills([parse_kill("client@4")], rounds=3, clients=9, combiners=2, auto=True)


def test_auto_mode_kills_a_combiner_of_the_round_or_a_node_that_is_not_one() -> None:
    # Prepare: round 2's combiners are auto-4 and auto-1 (heard in that order)
    chaos = Chaos((), 0.0, "reducer", auto=True, combiners=2)
    assigned(chaos, "auto-0", 1)
    assigned(chaos, "auto-3", 1)
    assigned(chaos, "auto-4", 2)
    assigned(chaos, "auto-1", 2)
    # Execute, Assert
    assert chaos.victim(parse_kill("combiner@2"), AUTOS) == "auto-1"
    assert chaos.victim(parse_kill("client@2"), AUTOS) == "auto-0"
    without_1 = [n for n in AUTOS if n != "auto-1"]
    assert chaos.victim(parse_kill("combiner@2"), without_1) == "auto-4"
    assert chaos.victim(parse_kill("client@2"), without_1) == "auto-0"
    # Round 3 is not known yet: round 2's live combiners stand in for it
    assert chaos.victim(parse_kill("combiner@3:plan"), AUTOS) == "auto-1"
    assert chaos.victim(parse_kill("client@3:plan"), AUTOS) == "auto-0"
    # Round 2's combiners all dead: the latest round with a live one (round 1's)
    assert chaos.victim(parse_kill("combiner@3"), ["auto-0", "auto-2", "auto-3"]) == "auto-0"
    assert chaos.victim(parse_kill("client@3"), ["auto-0", "auto-2", "auto-3"]) == "auto-2"


def test_auto_mode_spares_the_auto_node_in_office_and_kills_it_as_reducer() -> None:
    # Prepare: auto-0 combined in round 1, then took over as reducer
    chaos = Chaos((), 0.0, "reducer", auto=True, combiners=1)
    assigned(chaos, "auto-0", 1)
    assigned(chaos, "auto-2", 2)
    chaos.on_event("auto-0", {"event": "reducer-elected", "term": 2}, 5.0)
    alive = ["bootstrap", *AUTOS]
    # Execute, Assert
    assert chaos.office == "auto-0"
    assert chaos.victim(parse_kill("reducer@2"), alive) == "auto-0"
    assert chaos.victim(parse_kill("client@2"), alive) == "auto-1"
    assert chaos.victim(parse_kill("combiner@2"), alive) == "auto-2"
    # No live combiner known but the one in office: wait for the round's combiners
    assert chaos.victim(parse_kill("combiner@2"), ["auto-0", "auto-1"]) is None
    assert chaos.postpone(parse_kill("combiner@2"), ["auto-0", "auto-1"])
    # Every live auto node combines or leads: nobody to kill as a client, and no waiting
    assert chaos.victim(parse_kill("client@2"), ["auto-0", "auto-2"]) is None
    assert not chaos.postpone(parse_kill("client@2"), ["auto-0", "auto-2"])


def test_auto_mode_kill_before_anyone_said_it_combines_waits_for_the_round_s_combiners() -> None:
    # Prepare: kills at the plan of round 1, when no combiner-assigned was heard yet
    combiner, client = parse_kill("combiner@1:plan"), parse_kill("client@1:plan")
    chaos = Chaos((combiner, client), 0.0, "reducer", auto=True, combiners=2)
    planned = {"event": "round-planned", "round": 1, "amendment": 0}
    # Execute: the plan opens both kills; neither has a victim yet
    fired = [chaos.on_event("reducer", planned, 1.0), chaos.on_event("reducer", planned, 1.0)]
    victims = [chaos.victim(spec, AUTOS) for spec in (combiner, client)]
    postponed = [chaos.postpone(spec, AUTOS) for spec in (combiner, client)]
    # Assert
    assert fired == [combiner, client] and victims == [None, None] and postponed == [True, True]
    # The first combiner heard opens the combiner kill; the client kill waits for the second
    assert assigned(chaos, "auto-3", 1) == combiner
    assert chaos.victim(combiner, AUTOS) == "auto-3"
    assert chaos.on_event("auto-1", {"event": "fetch-started", "round": 1}, 2.0) is None
    assert assigned(chaos, "auto-1", 1) == client
    assert chaos.victim(client, AUTOS) == "auto-0"
    assert chaos.on_event("auto-2", {"event": "update-pushed", "round": 1}, 3.0) is None


def test_auto_mode_postponed_client_kill_fires_at_the_first_update_pushed() -> None:
    # Prepare: the election picks fewer combiners than expected
    client = parse_kill("client@1:fetch")
    chaos = Chaos((client,), 0.0, "reducer", auto=True, combiners=3)
    assert chaos.on_event("auto-5", {"event": "fetch-started", "round": 1}, 1.0) == client
    assert chaos.victim(client, AUTOS) is None and chaos.postpone(client, AUTOS)
    assigned(chaos, "auto-0", 1)
    # Execute, Assert
    assert chaos.on_event("auto-4", {"event": "model-fetched", "round": 1}, 2.0) is None
    assert chaos.on_event("auto-4", {"event": "update-pushed", "round": 1}, 3.0) == client
    assert chaos.victim(client, AUTOS) == "auto-1"
    # A kill whose victim is unknown for another reason is not postponed
    assert not chaos.postpone(parse_kill("reducer@1"), AUTOS)
