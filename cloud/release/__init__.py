"""Releasing: the one release path (sign into the image repository, assign in the director, deltas), the repository servers."""
