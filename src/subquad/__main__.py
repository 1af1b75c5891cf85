"""``python -m subquad`` runs the CLI."""

from subquad.cli import main

raise SystemExit(main())
