"""Limits per policy and tenant: the data path's limit stage, right after the decide stage.

``shared`` (token buckets and in-flight counts shared by all workers), ``lokiquery`` (Cloud's
``lokiQueryPolicy``) and ``stage`` (what a request is admitted under). The settings (the YAML's
``tenant_limits`` and a policy's ``attributes.gatewayLimits``) are ``gateway.tenant_limits``, which
``gateway.config`` imports; the page's form for them is ``gateway.web.limitsform``.
"""
