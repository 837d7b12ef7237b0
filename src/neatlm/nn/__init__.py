"""nn.Modules: the NeatLM model and its components."""
