"""bench/flower_simulation.py's apps: securefed's and Flower's SecAgg+ on the Simulation Engine, the demo's model."""
