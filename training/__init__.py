"""Training the paper's autoencoder with RFSQ and the baselines (``python training/train.py --help``)."""
