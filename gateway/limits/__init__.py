"""Limits per policy and tenant: the data path's limit stage, right after the decide stage.

``settings`` (the YAML's ``tenant_limits`` and a policy's ``attributes.gatewayLimits``), ``shared`` (token
buckets and in-flight counts shared by all workers), ``lokiquery`` (Cloud's ``lokiQueryPolicy``) and
``stage`` (what a request is admitted under). Kept free of imports here: ``gateway.config`` imports
``settings``.
"""
