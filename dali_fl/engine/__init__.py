"""The engine: the federation loop, local training, the run lifecycle and directory, processes, devices."""
