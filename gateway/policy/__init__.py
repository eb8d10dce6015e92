"""The domain: scopes, realms, label policies, tokens and the authorization decision. No I/O here."""
