"""Build: this device's facts, the engines (TensorRT, ONNX Runtime) behind one interface, the variant
choice, batch-size tuning and the memory budget."""
