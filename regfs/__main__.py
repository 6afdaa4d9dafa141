"""`python -m regfs` runs the command line."""

from regfs.cli import main

raise SystemExit(main())
