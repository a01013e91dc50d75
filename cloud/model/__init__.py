"""Models: the CNN and the transformer backbones, training, checkpoints, export to the
package a device runs, and measuring that package under ONNX Runtime."""
