"""Plants, fleet simulation and the demo: wires both sides together; production never imports it."""
