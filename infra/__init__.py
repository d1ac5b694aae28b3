"""What touches the outside world: configuration, the store, Prefect plumbing."""
