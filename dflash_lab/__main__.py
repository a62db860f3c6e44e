"""`python -m dflash_lab ...` (what `torchrun -m dflash_lab train ...` runs)."""

from dflash_lab.cli import main

raise SystemExit(main())
