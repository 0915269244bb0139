"""The upstream side of a call: the pooled HTTP client and its egress-checking resolver."""
