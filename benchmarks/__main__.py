"""Entry point: ``python -m benchmarks`` (what ``scripts/bench`` runs)."""

from benchmarks.runner import main

raise SystemExit(main())
