"""Where a latency comes from: this machine, a device behind a TVM RPC tracker, a cycle model, or
nowhere (``not measured``), chosen in one place (``factory.measurer_for``)."""
