"""HTTP routes of the classification service, one module per concern."""
