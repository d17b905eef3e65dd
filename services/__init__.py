"""The processes of sandboxctl: the I/O shell around the pure core."""
