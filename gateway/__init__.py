"""The access-policy gateway: Grafana Cloud-style access policies in front of Mimir, Loki and Tempo."""

__version__ = "0.1.0"
