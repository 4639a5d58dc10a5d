"""`python -m dpsel ...`: the same as the `dpsel` command."""
from dpsel.cli import main

main()
