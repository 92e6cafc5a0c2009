"""Scenario layer: running whole federations of real ``fednode`` processes (demos, tests,
emulated geo-distributed runs). Top tier: may use every layer below."""
