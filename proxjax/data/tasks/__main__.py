"""``python -m proxjax.data.tasks``: rebuilds (or ``--check``s) the shipped ``lee_last_word`` items."""

from __future__ import annotations

from proxjax.data.tasks import main

if __name__ == "__main__":
  raise SystemExit(main())
