"""Worker processes: the fork server, the runtime a worker runs, and the operations."""
