"""The version of latentgraph, stamped into every saved config."""

__version__ = "0.1.0"
