"""The model stage: reading, checking and canonicalizing ONNX files, the graph editor the passes use,
ONNX Runtime as the numerical reference, example networks, and atomic writes."""
