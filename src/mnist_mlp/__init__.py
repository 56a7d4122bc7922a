"""mnist-mlp: the classic Keras MNIST multilayer perceptron as a dependable CLI."""

__version__ = "0.1.0"
