"""`covey eval`: adapters beside their base model on held-out records (the metrics themselves
are `covey.train.metrics`, shared with every round's evaluation)."""
