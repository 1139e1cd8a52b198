"""mailroster daemon layer."""
