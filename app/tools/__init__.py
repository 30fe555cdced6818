"""Offline tools around the server: the ``evalserve`` command line, the benchmark, evaluation
and precision agreement. Nothing on the serving path imports them (import-linter checks it)."""
