"""``fednode demo --kill`` specifications: parsing, refusals, and when each fires."""

from __future__ import annotations

import pytest

from fednode.errors import ConfigError
from fednode.scenario.kills import KillSpec, check_kills, parse_kill


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
