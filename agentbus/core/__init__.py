"""Pure domain logic (no I/O): versions, read sets, validation and the error model."""
