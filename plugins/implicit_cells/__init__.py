"""First-party cell plugins of implicit-layers, one module per cell family.

Each module is registered through the ``implicit_layers`` entry-point group, exactly as a
third-party plugin would be.
"""
