"""The wire: JSON-RPC framing, requests in, answers and events out, who may connect."""
