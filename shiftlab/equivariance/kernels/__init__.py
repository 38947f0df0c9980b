"""How the alignment plans read the shifted maps, behind one interface (``differences``): the
eager PyTorch passes (``eager``) or the optional compiled CPU kernel (``native``)."""
