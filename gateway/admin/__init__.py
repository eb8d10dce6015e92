"""The admin surface: the Access Policies and Tokens API (and later the page), on the store."""
