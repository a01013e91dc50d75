"""The edge agent: what ships to a device (ONNX Runtime, numpy, paho-mqtt; never torch)."""
