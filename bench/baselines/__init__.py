"""Hand-written check-and-write services with agentbus's commit HTTP shape.

They exist so the benchmark can say what agentbus costs over the simplest correct thing a
developer would write by hand on the same backend, behind the same HTTP server settings.
"""
