"""ArrayOps for the frameworks. Import the one you need; each imports its framework."""
