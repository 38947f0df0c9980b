"""The package version, and nothing else: any module may import it without importing shiftlab."""
__version__ = "0.2.0"
