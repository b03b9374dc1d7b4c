"""The supervisor process: one loop (loop.py) and the parts it runs; it never touches storage."""
