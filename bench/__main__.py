"""``python -m bench``: run the whole benchmark, or with ``--baseline``/``--limits`` only the side-by-side
comparison (bench/compare.py); see ``python -m bench --help``."""

from bench import compare, run

args = run.parse_args(None)
raise SystemExit(compare.main(args) if args.compare else run.main())
