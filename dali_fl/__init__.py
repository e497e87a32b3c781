"""dali-fl: federated learning fed by DALI."""
