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
