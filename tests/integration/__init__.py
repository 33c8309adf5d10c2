"""Integration-point tests: our layers wherever torch's BatchNorm works (compile, export, jit, torch.func)."""
