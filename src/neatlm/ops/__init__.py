"""Pure tensor functions. Each fast op has a ``*_reference`` loop beside it; imports only torch."""
