"""galmorph model component."""
