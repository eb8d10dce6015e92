"""The benchmark harness: ``make bench`` (``python -m bench``).

Measures the gateway beside a direct connection to a fixed-response upstream and beside nginx as a
plain reverse proxy with the same worker count, in interleaved runs, and writes ``bench/results.json``
and ``bench/results.png``. See ``bench/README.md``.
"""
