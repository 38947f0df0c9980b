"""Per-layer equivariance, measured: shift grids (``shifts``), hooks (``capture``), layer strides
(``geometry``), alignment plans (``align``, ``bilinear``, ``stencil``), distances
(``metrics``), the streaming engine (``engine``) and the optional CPU kernel (``kernels``)."""
