"""Node layer: a node's configuration, from a TOML file and command-line flags (flags win).

```toml
[node]
role = "combiner"            # client | combiner | reducer | bootstrap | auto
federation = "hospitals"
data_dir = "/var/lib/fednode"
listen = ["/ip4/0.0.0.0/tcp/4001"]
bootstrap = ["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."]
region = "eu-north"
capacity = 20
heartbeat_interval = 1.0
mdns = false
task = "fednode.task.digits"  # a client: the task it trains (module or .py file)
partition_index = 0          # a client: which share of the task's data it holds...
partition_count = 10         # ...out of how many
```

A reducer's session settings live in a ``[session]`` table (``fednode.node.session``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from fednode.errors import ConfigError
from fednode.protocol.dialing import peer_of

Role = Literal["client", "combiner", "reducer", "bootstrap", "auto"]
ROLES: tuple[str, ...] = get_args(Role)
_FEDERATION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    role: Role = "auto"
    federation: str = "default"
    data_dir: Path = Path("fednode-data")
    listen: tuple[str, ...] | None = None  #: None: the role's default (see :meth:`listen_addrs`)
    bootstrap: tuple[str, ...] = ()
    region: str = ""
    capacity: int = 10
    heartbeat_interval: float = 1.0
    mdns: bool = False
    task: str | None = None  #: a client's task (None: ``fednode.task.DEFAULT_TASK``)
    partition_index: int = 0  #: a client's share of the task's data...
    partition_count: int = 1  #: ...out of this many

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if not _FEDERATION.match(self.federation):
            raise ConfigError(
                f"federation id {self.federation!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        for addr in self.bootstrap:
            try:
                peer_of(addr)
            except ValueError:
                raise ConfigError(
                    f"bootstrap address {addr!r} must end in /p2p/<peer id>"
                ) from None
        for addr in self.listen or ():
            if not addr.startswith("/"):
                raise ConfigError(f"listen address {addr!r} is not a multiaddr")
        if not 0.05 <= self.heartbeat_interval <= 60:
            raise ConfigError("heartbeat_interval must be between 0.05 and 60 seconds")
        if self.capacity < 0:
            raise ConfigError("capacity must be non-negative")
        if len(self.region) > 64:
            raise ConfigError("region must be at most 64 characters")
        if self.task is not None and not self.task.strip():
            raise ConfigError("task must name a module or a .py file")
        if not 0 <= self.partition_index < self.partition_count:
            raise ConfigError(
                f"partition index {self.partition_index} must be in [0, {self.partition_count})"
            )

    def listen_addrs(self) -> tuple[str, ...]:
        """Where to listen. A client needs no inbound port: it dials out."""
        if self.listen is not None:
            return self.listen
        if self.role == "client":
            return ()
        return ("/ip4/0.0.0.0/tcp/0",)

    @property
    def key_path(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def peerstore_path(self) -> Path:
        return self.data_dir / "peers.json"


def load_config(path: Path | None, **overrides: Any) -> NodeConfig:
    """The config in ``path`` (its ``[node]`` table), with non-None ``overrides`` applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        table = document.get("node", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [node] must be a table")
        values.update(table)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    try:
        for key in ("listen", "bootstrap"):
            if key in values:
                values[key] = tuple(values[key])
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return NodeConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad config value: {exc}") from None


__all__ = ["ROLES", "NodeConfig", "Role", "load_config", "replace"]
