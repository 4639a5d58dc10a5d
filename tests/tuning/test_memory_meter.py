"""The block memory meter the benchmarks use (peft_train.memory, the one home of the meters)."""
import numpy as np

from peft_train.memory import PeakMemory, current_rss, peak_rss


def test_peak_memory_sees_what_a_block_allocates_on_cpu():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        block = np.ones(64 * 2**20 // 8)   # 64 MiB, written, so resident
        del block
    assert big.delta >= 48 * 2**20 > small.delta
    assert peak_rss() >= current_rss() > 0


def test_a_nested_block_does_not_hide_the_enclosing_blocks_peak():
    with PeakMemory("cpu") as outer:
        block = np.ones(64 * 2**20 // 8)
        del block
        with PeakMemory("cpu") as inner:   # resets the kernel's high-water mark the outer block relies on
            pass
    assert outer.delta >= 48 * 2**20 > inner.delta
