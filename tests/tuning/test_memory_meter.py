"""The block memory meter the benchmarks use (peft_train.memory, the one home of the meters)."""
import numpy as np

from peft_train.memory import PeakMemory, current_rss, peak_rss

# RSS counts file-backed pages too, which the kernel may evict or fault back in while a block runs on a loaded
# machine (a CI run beside other jobs failed both tests once, with a 64 MiB block and a 48 MiB bar; not
# reproduced since): a large block and wide margins keep the verdict about the meter.
BLOCK = 256 * 2**20
SEEN, QUIET = 192 * 2**20, 64 * 2**20


def test_peak_memory_sees_what_a_block_allocates_on_cpu():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        block = np.ones(BLOCK // 8)   # written, so resident
        del block
    assert big.delta >= SEEN and small.delta < QUIET
    assert peak_rss() >= current_rss() > 0


def test_a_nested_block_does_not_hide_the_enclosing_blocks_peak():
    with PeakMemory("cpu") as outer:
        block = np.ones(BLOCK // 8)
        del block
        with PeakMemory("cpu") as inner:   # resets the kernel's high-water mark the outer block relies on
            pass
    assert outer.delta >= SEEN and inner.delta < QUIET
