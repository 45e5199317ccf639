"""Sky access: cutouts by position from the Legacy Survey viewer, checked and cached.

Owns what a user chooses about fetching (`options`), the HTTP client with its politeness, retries
and deadlines (`client`) and the size-bounded disk cache shared by processes (`cache`). Fetched
bytes go through `cutouts` like any upload.
"""
