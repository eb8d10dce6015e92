"""The data path: identify → classify → authorize → restrict → forward."""
