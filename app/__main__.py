"""``python -m app`` is ``evalserve``; with no command it serves."""

from app.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
