"""galmorph service component."""
