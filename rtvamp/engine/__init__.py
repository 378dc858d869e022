"""The live engine: rolling buffers, transport, looper, scheduler, worker processes."""
