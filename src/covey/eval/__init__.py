"""Answer quality a user can see: metrics against references, and `covey eval`."""
