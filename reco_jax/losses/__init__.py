"""Loss functions: supervised CE, unsupervised pseudo-label CE, ReCo and relatives."""
