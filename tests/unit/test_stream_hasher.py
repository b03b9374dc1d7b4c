"""agent/storage/checksum.py StreamHasher: the block checksum of bytes handed over in pieces
equals its definition (the hash of each 4 MiB block's digest), however the bytes are cut
into data and zeros, and whole blocks of zeros cost one update, not one per block."""

import random

import blake3
import pytest

from agent.storage import checksum

BLOCK = checksum.BLOCK


def by_definition(data: bytes) -> str:
    outer = blake3.blake3()
    for at in range(0, len(data), BLOCK):
        outer.update(blake3.blake3(data[at:at + BLOCK]).digest())
    return "blake3-4m:" + outer.hexdigest()


@pytest.mark.parametrize("seed", range(12))
def test_any_cut_into_data_and_zeros_gives_the_definitions_checksum(seed):
    rnd = random.Random(seed)
    size = rnd.choice([3 * BLOCK, 5 * BLOCK + 4097, 2 * BLOCK - 1, BLOCK + 1])
    data = bytearray(size)
    pieces, pos = [], 0
    while pos < size:
        n = min(size - pos, rnd.choice([1, 511, 4096, BLOCK - 3, BLOCK, 2 * BLOCK + 7]))
        zero = rnd.random() < 0.5
        if not zero:
            data[pos:pos + n] = rnd.randbytes(n)
        pieces.append((pos, n, zero))
        pos += n
    h = checksum.StreamHasher(size, keep_blocks=True)
    for at, n, zero in pieces:
        h.zeros(n) if zero else h.data(bytes(data[at:at + n]))
    assert h.hexdigest() == by_definition(bytes(data))
    assert len(h.blocks) == -(-size // BLOCK)


def test_an_empty_8_tib_disk_is_hashed_without_a_step_per_block():
    size = 8 << 40
    h = checksum.StreamHasher(size)
    calls = []
    real = h._outer

    class Counting:
        def update(self, b):
            calls.append(len(b))
            real.update(b)

        def hexdigest(self):
            return real.hexdigest()
    h._outer = Counting()
    for _ in range(size >> 30):
        h.zeros(1 << 30)
    h.hexdigest()
    assert sum(calls) == 32 * (size // BLOCK) and len(calls) <= size >> 30


def test_runs_of_zero_blocks_longer_than_one_update_hash_as_defined():
    """Runs of zero blocks handed to the outer hash in pieces (ZERO_RUN digests each, on
    several cores), between blocks of data and before a short last block: the digest is
    the definition's, as one core computes it block by block."""
    rnd = random.Random(7)
    zero = blake3.blake3(bytes(BLOCK)).digest()
    data = rnd.randbytes(BLOCK)
    first, second = 2 * checksum.ZERO_RUN + 3, checksum.ZERO_RUN - 1
    size = (first + 1 + second) * BLOCK + 100
    h = checksum.StreamHasher(size, keep_blocks=True)
    h.zeros(first * BLOCK)
    h.data(data)
    h.zeros(second * BLOCK + 100)
    digests = [zero] * first + [blake3.blake3(data).digest()] + [zero] * second + \
        [blake3.blake3(bytes(100)).digest()]
    outer = blake3.blake3()
    for d in digests:
        outer.update(d)
    assert h.hexdigest() == "blake3-4m:" + outer.hexdigest()
    assert h.blocks == digests
