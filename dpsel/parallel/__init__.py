"""Data parallelism under torchrun / accelerate launch: `env` reads what the launcher set (rank, world), and
`collectives` is the process group's shard / gather / sum / broadcast. Single-process runs use `env` alone."""
