"""Serving: devices, placement (pure), cost model, health, backend loading and the engine loop that ties them."""
