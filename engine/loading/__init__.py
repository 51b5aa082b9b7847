"""Loading models onto devices: files to modules, device placement, CPU kernels."""
