"""regfs: a read-only FUSE filesystem that mounts any revision of a DVC data registry."""

__version__ = "0.1.0"
