"""Loss functions: tensors in, tensors out, each with its equation and tensor shapes in the docstring."""
