"""`python -m kdcache.cli ...` (and `torchrun ... -m kdcache.cli train ...`): the same commands as `kdcache`."""

from kdcache.cli import main

main()
