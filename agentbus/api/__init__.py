"""HTTP routers; each module is one part of the SPEC's HTTP contract."""
