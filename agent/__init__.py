"""hostagent: a crash-only host agent speaking JSON-RPC 2.0 over ZeroMQ."""

__version__ = "0.1.0"
