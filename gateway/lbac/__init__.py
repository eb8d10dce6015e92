"""Label-based access control: restrict queries so a backend returns only visible series.

``promql`` rewrites PromQL and ``match[]`` selectors (enforce mode). Anything that cannot
be rewritten faithfully raises :class:`RewriteError`; the gateway turns it into a 400.
"""


class RewriteError(ValueError):
    """The query is refused; the message tells the user why (it becomes a 400)."""
