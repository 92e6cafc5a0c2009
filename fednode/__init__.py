"""fednode: a peer-to-peer federated-learning node over libp2p."""

__version__ = "0.1.0"
