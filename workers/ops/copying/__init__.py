"""How a copy moves its bytes: through qemu (qemu.py), a chain layer by layer (chain.py),
and its progress (progress.py)."""
