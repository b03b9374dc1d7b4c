"""The two copy movers: the kernel's (kernel.py, raw to raw) and NBD's (nbd.py, anything
qemu reads)."""
