"""mmbalance: train multimodal classifiers that use every modality."""

__version__ = "0.1.0"
