"""Files and processes: atomic writes, safetensors weights, the torchrun process group, the cache folder,
TensorBoard. No model maths."""
