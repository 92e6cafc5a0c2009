"""Net layer: the host interface (``interface``), the libp2p adapter and the in-memory transport,
the blob and push data-plane protocols. Imports wire, crypto and protocol; nothing above."""
