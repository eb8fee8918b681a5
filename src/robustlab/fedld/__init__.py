"""FedLD on Flower: margin control, principal-gradient aggregation, baselines, medical-image experiments."""
