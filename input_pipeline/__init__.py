"""Host-side input pipeline: datasets, TFDS builders and tf.data preprocessing."""
