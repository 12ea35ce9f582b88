"""RLDS data pipeline: read + standardize -> trajectory transforms -> flatten -> frame transforms -> mix -> batch.

Each stage's module says what belongs there and its output schema. TensorFlow is used for input only
(tf.data on the host CPU); nothing here imports the model or training code.
"""
