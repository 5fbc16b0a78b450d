"""securefed's Flower example: the demo's digits MLP trained across Flower nodes through secure aggregation."""
