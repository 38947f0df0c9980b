"""The optional C kernel for the CPU, behind one interface (``native``)."""
