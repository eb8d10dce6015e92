"""Forward-auth: the gateway as the auth service of another proxy (db-auth-gateway, nginx, Traefik, Envoy).

``handler`` serves the endpoints, ``callers`` reads each proxy's sub-request convention, ``enforcement``
verifies that a backend behind the proxy enforces label policies. The decision itself is the data path's
(``gateway.proxy.decide``).
"""
