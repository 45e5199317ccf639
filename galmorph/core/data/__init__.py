"""Data sets: Galaxy10-layout HDF5 files, their splits and duplicates, and result-table columns.

Owns lazy, validated HDF5 access (`galaxy10`), seeded stratified splits saved as JSON (`splits`),
duplicate detection (`duplicates`) and the columns every result table shares (`tables`).
"""
