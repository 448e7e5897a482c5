"""Deprecated: the old flat runtime package. Its public modules moved (see docs/architecture.md);
the paths below keep working for one release, with a DeprecationWarning."""
