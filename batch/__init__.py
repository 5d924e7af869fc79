"""hemaray."""
