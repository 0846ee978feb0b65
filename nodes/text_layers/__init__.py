"""Paper 2 (Staniszewski et al., ICLR 2025): the layers that render text."""
