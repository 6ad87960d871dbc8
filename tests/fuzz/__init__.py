"""Fuzz targets for the parsers of untrusted bytes (see docs/RELIABILITY.md, "Fuzzing")."""
