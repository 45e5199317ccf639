"""galmorph training component."""
