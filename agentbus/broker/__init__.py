"""The model broker: identity-scoped, budgeted routing of agents' model calls."""
