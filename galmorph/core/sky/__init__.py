"""Sky access: cutouts by position from the Legacy Survey viewer, checked and cached.

Owns what a user chooses about fetching (`options`), the HTTP client with its politeness, retries
and deadlines (`client`) and the size-bounded disk cache shared by processes (`cache`). Fetched
bytes go through `cutouts` like any upload. What to ask for (size, pixel scale, bands) comes from
the model's InputSpec (galmorph.core.inputspec), never from the model file itself.
"""
